"""A POS terminal speaking the documented card protocol: what `cardcore pos`, `cardcore
bench pos` and the certification tests use, and what a POS vendor can compare bytes with.

It behaves as a UnionPay-style terminal does: it signs on to get working keys (checking
their check values), MACs every financial message and checks the MAC of every reply, counts
its own STAN and batch (999999 wraps to 000001), keeps its batch totals for settlement, and
when a financial request gets no reply (or a reply with a bad MAC) it keeps a reversal that
it sends before its next transaction. It also keeps the reversal copy of its last financial
request, so that the cashier can cancel it after its reply came (`reverse`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from dataclasses import dataclass, field, replace

from cardcore.frontend_gateway import codec, security
from cardcore.frontend_gateway.security import KeyMode, WorkingKeys

TPDU = bytes.fromhex("6000010000")  # id 60, destination 0001 (the host), source 0000
HEADER = bytes.fromhex("603100000000")  # POS application, version 31
NET_CODE_OF_MODE = {KeyMode.TDES: "003", KeyMode.AES: "005"}
TXN_VOID = "23"  # F60.1 of a void


class TerminalError(Exception):
    """The exchange failed on the terminal's side: no reply, bad reply MAC, closed line."""


class ReversalOwed(TerminalError):
    """A request waits behind the reversal the terminal owes, which was answered `code`
    (91: slow down, 77: sign on again, 96: later) and is sent again first next time."""

    def __init__(self, code: str) -> None:
        super().__init__(f"a reversal is still owed (answered {code})")
        self.code = code


@dataclass
class Reply:
    fields: dict[str, str]
    processing: int  # the header's processing-requirement nibble (3: sign on again)
    raw: bytes  # the whole frame as read, length prefix included

    @property
    def code(self) -> str:
        return self.fields.get("39", "")

    @property
    def balance(self) -> int | None:
        """The available balance (F54, amount type 02)."""
        return self._amount(codec.AMOUNT_TYPE_AVAILABLE)

    @property
    def remainder(self) -> int | None:
        """A partial approval's amount due: what the cashier still collects (F54, type 04)."""
        return self._amount(codec.AMOUNT_TYPE_DUE)

    @property
    def approved_amount(self) -> int | None:
        """What an approval took: F4 (on a partial approval, less than was asked)."""
        value = self.fields.get("4")
        return None if value is None else int(value)

    @property
    def tlv(self) -> dict[str, str]:
        """The F48 TLV items of a 0210 / 0230 (empty when there are none)."""
        value = self.fields.get("48")
        if value is None or self.fields.get("t") not in ("0210", "0230"):
            return {}
        return dict(codec.tlv_decode(value))

    def _tlv_int(self, tag: str) -> int | None:
        found = self.tlv.get(tag)
        return None if found is None else int(found)

    @property
    def discount_bp(self) -> int | None:
        """The card class's discount in basis points (F48 TLV `DB` of an inquiry reply)."""
        return self._tlv_int(codec.TLV_DISCOUNT_BP)

    @property
    def points(self) -> int | None:
        """Points earned or spent by the request (F48 TLV `PT`)."""
        return self._tlv_int(codec.TLV_POINTS)

    @property
    def points_balance(self) -> int | None:
        return self._tlv_int(codec.TLV_POINTS_BALANCE)

    @property
    def discount(self) -> int | None:
        """A coupon's or a manager's discount, in fen (F48 TLV `CD`)."""
        return self._tlv_int(codec.TLV_DISCOUNT)

    @property
    def forfeited(self) -> int | None:
        return self._tlv_int(codec.TLV_FORFEITED)

    @property
    def uses_left(self) -> int | None:
        return self._tlv_int(codec.TLV_USES_LEFT)

    @property
    def rewards(self) -> list[str]:
        """Coupon codes the purchase earned (F48 TLV `RC`, one per coupon)."""
        value = self.fields.get("48")
        if value is None or self.fields.get("t") not in ("0210", "0230"):
            return []
        return [item for tag, item in codec.tlv_decode(value) if tag == codec.TLV_REWARD]

    @property
    def refusal(self) -> str:
        """The rule that refused the request (F48 TLV `RF`), or ""."""
        return self.tlv.get(codec.TLV_REFUSAL, "")

    def _amount(self, amount_type: str) -> int | None:
        value = self.fields.get("54")
        return None if value is None else codec.parse_amounts(value).get(amount_type)


@dataclass
class _Line:
    stan: str
    kind: str  # purchase | refund | topup_confirm | void
    amount: int
    voided: bool = False


@dataclass
class PosTerminal:
    host: str
    port: int
    tid: str
    mid: str
    tmk: bytes = field(repr=False)
    mode: KeyMode = KeyMode.AES
    stan: str = "000000"
    batch: str = "000001"
    timeout_s: float = 30.0
    keys: WorkingKeys | None = field(default=None, repr=False)
    pending_reversal: dict[str, str] | None = None
    # A top-up's 0220 confirmation not yet answered for good (the cash is in the drawer): sent
    # again, same STAN, before anything else, until 00 or a refusal that will not change.
    pending_confirmation: dict[str, str] | None = None
    last_request: dict[str, str] | None = None  # the 0400 copy of the last financial request
    lines: list[_Line] = field(default_factory=list)
    last_sent: bytes = field(default=b"", repr=False)  # a card number, a PIN block
    tls: ssl.SSLContext | None = None  # a gateway that serves TLS
    _reader: asyncio.StreamReader | None = None
    _writer: asyncio.StreamWriter | None = None

    # --- the line -----------------------------------------------------------------------------

    async def connect(self) -> None:
        self._reader, self._writer = await asyncio.open_connection(
            self.host, self.port, ssl=self.tls
        )

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await self._writer.wait_closed()
            self._writer = self._reader = None

    async def send_raw(self, frame: bytes) -> None:
        if self._writer is None:
            await self.connect()
        assert self._writer is not None
        self._writer.write(frame)
        await self._writer.drain()

    async def read_reply(self) -> Reply:
        assert self._reader is not None
        try:
            # One deadline for the whole reply (a timer, not a task per read as wait_for makes).
            async with asyncio.timeout(self.timeout_s):
                prefix = await self._reader.readexactly(2)
                payload = await self._reader.readexactly(int.from_bytes(prefix, "big"))
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError) as exc:
            await self.close()
            raise TerminalError(f"no reply: {type(exc).__name__}") from None
        frame = codec.split_frame(payload)
        if frame.tpdu != codec.reply_tpdu(TPDU):
            raise TerminalError("reply TPDU does not swap our addresses")
        return Reply(codec.decode(frame.body), frame.header[2] & 0x0F, prefix + payload)

    async def exchange(self, fields: dict[str, str], *, mac: bool) -> Reply:
        return await self._exchange_body(fields, self.encode(fields, mac=mac), mac=mac)

    async def _exchange_body(self, fields: dict[str, str], body: bytes, *, mac: bool) -> Reply:
        self.last_sent = codec.pack_frame(TPDU, HEADER, body)
        await self.send_raw(self.last_sent)
        reply = await self.read_reply()
        self._check_reply(fields, reply, mac=mac)
        return reply

    def encode(self, fields: dict[str, str], *, mac: bool) -> bytes:
        if not mac:
            return codec.encode(fields)
        if self.keys is None:
            raise TerminalError("not signed on: no MAC key")
        body = codec.encode(codec.with_mac_placeholder(fields))
        return codec.set_mac(body, self.keys.tag(self.mode, codec.mac_input(body)))

    def _check_reply(self, sent: dict[str, str], reply: Reply, *, mac: bool) -> None:
        f = reply.fields
        if f["t"] != codec.response_mti(sent["t"]):
            raise TerminalError(f"reply MTI {f['t']} to {sent['t']}")
        for name in ("3", "11", "41"):
            if sent.get(name) != f.get(name):
                raise TerminalError(f"reply field {name} does not echo the request")
        if reply.code in APPROVAL_CODES and sent.get("42") != f.get("42"):
            raise TerminalError("reply field 42 does not echo the request")
        unmacd_ok = reply.code in UNMACD_CODES or (sent["t"] == "0820" and reply.code == "00")
        if mac and "64" not in f and not unmacd_ok:  # (a sign-off the gateway had no keys for)
            raise TerminalError("a reply without a MAC")  # forged: as a MAC that fails
        if mac and "64" in f and self.keys is not None:
            body = reply.raw[codec.LENGTH_BYTES + codec.TPDU_BYTES + codec.HEADER_BYTES :]
            if not self.keys.verify(self.mode, codec.mac_input(body), bytes.fromhex(f["64"])):
                raise TerminalError("reply MAC does not verify")

    # --- messages ------------------------------------------------------------------------------

    def next_stan(self) -> str:
        self.stan = codec.next_stan(self.stan)
        return self.stan

    def _base(
        self, mti: str, pcode: str | None, txn_type: str, net: str = "000", stan: str = ""
    ) -> dict[str, str]:
        """A request's common fields, under the next STAN (or `stan`: a coupon redeem under
        its reservation's)."""
        now = time.localtime()
        fields = {"t": mti}
        if pcode is not None:
            fields["3"] = pcode
        fields["11"] = stan or self.next_stan()
        fields["12"] = time.strftime("%H%M%S", now)
        fields["13"] = time.strftime("%m%d", now)
        fields["41"] = self.tid
        fields["42"] = self.mid
        fields["60"] = codec.format_f60(codec.Field60(txn_type, self.batch, net))
        return fields

    async def sign_on(self) -> Reply:
        fields = self._base("0800", None, "00", NET_CODE_OF_MODE[self.mode])
        reply = await self.exchange(fields, mac=False)
        if reply.code == "00":
            self.keys = security.read_working_keys(
                self.mode, self.tmk, bytes.fromhex(reply.fields["62"])
            )
            self.batch = codec.parse_f60(reply.fields["60"]).batch  # adopt the host's batch
        return reply

    async def sign_off(self) -> Reply:
        """MAC'd under the keys it ends (without keys there is nothing to end)."""
        signed_on = self.keys is not None
        try:
            return await self.exchange(self._base("0820", None, "00", "002"), mac=signed_on)
        finally:
            self.keys = None  # whatever the answer: a new sign-on comes next

    async def echo(self) -> Reply:
        return await self.exchange(self._base("0820", None, "00", "301"), mac=False)

    async def financial(self, fields: dict[str, str]) -> Reply:
        """Send a MAC'd request, first any reversal still owed (nothing else goes until it is
        done); keep a reversal of this one until its reply arrives with a good MAC. A top-up
        confirmation is never reversed (the cash was taken): it is sent again instead."""
        if self.pending_reversal is not None and not _same_request(self.pending_reversal, fields):
            owed = await self.send_pending_reversal()
            if self.pending_reversal is not None:
                raise ReversalOwed(owed.code)
        confirmation = self.pending_confirmation
        if confirmation is not None and confirmation.get("11") != fields.get("11"):
            owed = await self.send_pending_confirmation()
            if self.pending_confirmation is not None:
                raise TerminalError(f"a top-up confirmation is still owed (answered {owed.code})")
        body = self.encode(fields, mac=True)  # one that cannot be encoded is never owed
        kept = {k: v for k, v in fields.items() if k not in ("2", "35", "52", "53", "37")}
        self.last_request = {**kept, "t": "0400", "39": REVERSAL_NO_REPLY}
        if not (fields["t"] == "0220" and fields.get("3") == "630000"):  # not a confirmation
            self.pending_reversal = dict(self.last_request)
        try:
            reply = await self._exchange_body(fields, body, mac=True)
        except TerminalError as exc:
            if "MAC" in str(exc) and self.pending_reversal is not None:
                self.pending_reversal["39"] = REVERSAL_BAD_MAC
            raise
        if "64" in reply.fields:
            # Only a MAC'd reply settles it: an unMAC'd code (91, 77, A0, 13, 14, 30, 96) can
            # be forged on the line over an approval, and proves nothing (card-protocol 8).
            self.pending_reversal = None
        return reply

    async def send_pending_reversal(self) -> Reply:
        """Send the reversal owed; it is done on 00, 12 or 25 (else still owed). On 00 the
        batch lines follow: the reversed request's line goes, a reversed void's purchase
        counts again."""
        owed = self.pending_reversal
        assert owed is not None
        reply = await self.exchange(owed, mac=True)
        if reply.code in ("00", "12", "25"):
            self.pending_reversal = None
        if reply.code == "00":
            self._reversed(owed)
        return reply

    async def reverse(self, original: dict[str, str] | None = None) -> Reply:
        """The cashier cancels a financial request whose reply came: a 0400 (reason 06) of
        `original`, a reversal copy as `last_request` holds (by default that one). It is
        owed like any reversal until a 0410 with 00, 12 or 25 arrives."""
        if self.pending_reversal is not None:
            raise TerminalError("a reversal is still owed: it goes first")
        copy = original or self.last_request
        if copy is None:
            raise TerminalError("no financial request to reverse")
        assert copy["t"] == "0400", "a reversal copy, not a request"
        self.pending_reversal = {**copy, "39": REVERSAL_CANCELLED}
        return await self.send_pending_reversal()

    def _reversed(self, copy: dict[str, str]) -> None:
        f60 = codec.parse_f60(copy["60"])
        if f60.batch != self.batch:
            return  # a request of an earlier batch: this batch's lines are not its
        self.lines = [x for x in self.lines if x.stan != copy["11"]]
        if f60.txn_type == TXN_VOID and "61" in copy:
            voided = codec.parse_f61(copy["61"]).stan  # the void is undone: its purchase stands
            for line in self.lines:
                if line.stan == voided:
                    line.voided = False

    def _card(self, fields: dict[str, str], pan: str, pin: str | None) -> None:
        fields["2"] = pan
        # F22: PAN keyed in (01), then 1 = a PIN was entered, 2 = none (UnionPay)
        fields["22"] = "012" if pin is None else "011"
        if pin is not None:
            assert self.keys is not None
            block = (
                security.pin_block_4(pin, pan, self.keys.pik)
                if self.mode is KeyMode.AES
                else security.pin_block_0(pin, pan, self.keys.pik)
            )
            fields["26"] = "06"
            fields["52"] = block.hex().upper()

    async def inquiry(self, pan: str, pin: str | None = None) -> Reply:
        fields = self._base("0200", "310000", "01")
        self._card(fields, pan, pin)
        fields["25"] = "00"
        fields["49"] = "156"
        return await self.financial(_ordered(fields))

    async def purchase(
        self, pan: str, amount: int, pin: str | None = None, *, partial: bool = False
    ) -> Reply:
        """A sale. With `partial` the terminal says (F60.6 = 1) it takes a partial approval:
        a card holding less than `amount` pays what it has (code 10, F4 the amount taken,
        F54 the remainder due), and the batch counts the amount taken."""
        fields = self._base("0200", "000000", "22")
        if partial:
            fields["60"] = codec.format_f60(codec.Field60("22", self.batch, "000", True))
        self._card(fields, pan, pin)
        fields |= {"4": f"{amount:012d}", "25": "00", "49": "156"}
        reply = await self.financial(_ordered(fields))
        if reply.code in APPROVAL_CODES:
            taken = reply.approved_amount if reply.code == "10" else amount
            self.lines.append(_Line(fields["11"], "purchase", amount if taken is None else taken))
        return reply

    async def void(self, pan: str, amount: int, original_stan: str) -> Reply:
        fields = self._base("0200", "200000", TXN_VOID)
        self._card(fields, pan, None)
        fields |= {"4": f"{amount:012d}", "25": "00", "49": "156"}
        fields["61"] = codec.format_f61(codec.Field61(self.batch, original_stan, ""))
        reply = await self.financial(_ordered(fields))
        if reply.code == "00":
            for line in self.lines:
                if line.stan == original_stan:
                    line.voided = True
        return reply

    async def refund(
        self, pan: str, amount: int, rrn: str, original_batch: str, original_stan: str
    ) -> Reply:
        fields = self._base("0220", "200000", "25")
        self._card(fields, pan, None)
        fields |= {"4": f"{amount:012d}", "25": "00", "37": rrn, "49": "156"}
        fields["61"] = codec.format_f61(codec.Field61(original_batch, original_stan, ""))
        reply = await self.financial(_ordered(fields))
        if reply.code == "00":
            self.lines.append(_Line(fields["11"], "refund", amount))
        return reply

    async def topup(self, pan: str, amount: int) -> Reply:
        fields = self._base("0200", "630000", "48")
        self._card(fields, pan, None)
        fields |= {"4": f"{amount:012d}", "25": "00", "49": "156"}
        return await self.financial(_ordered(fields))

    async def topup_confirm(self, original_stan: str, amount: int) -> Reply:
        """The 0220 that makes a top-up's value available. Owed until answered for good:
        without a reply, or on 96 / 91 / 77 / A0, it is sent again with the same STAN
        (`send_pending_confirmation`) before the next request, by this run or the next."""
        fields = self._base("0220", "630000", "49")
        fields |= {"4": f"{amount:012d}", "25": "00", "49": "156"}
        fields["61"] = codec.format_f61(codec.Field61(self.batch, original_stan, ""))
        self.pending_confirmation = _ordered(fields)
        return await self.send_pending_confirmation()

    async def send_pending_confirmation(self) -> Reply:
        """The owed confirmation again, with its STAN, in the terminal's current batch (a
        sign-on since may have moved it: F61 still names the top-up). Done on 00, and on a
        refusal that will not change (12: confirmed already; 25, 64, 94); owed otherwise."""
        owed = self.pending_confirmation
        assert owed is not None
        f60 = codec.parse_f60(owed["60"])
        if f60.batch != self.batch:
            owed = {**owed, "60": codec.format_f60(replace(f60, batch=self.batch))}
            self.pending_confirmation = owed
        reply = await self.financial(owed)
        if reply.code in CONFIRM_DONE_CODES:
            self.pending_confirmation = None
        if reply.code == "00":
            self.lines.append(_Line(owed["11"], "topup_confirm", int(owed["4"])))
        return reply

    async def private(
        self,
        pcode: str,
        pan: str | None,
        amount: int | None,
        tlv: list[tuple[str, str]] | None = None,
        *,
        pin: str | None = None,
        original_stan: str | None = None,
        rrn: str | None = None,
        stan: str = "",
    ) -> Reply:
        """A message with a private processing code (90..98: points, coupons, service and
        manager cards); its data in F48 TLV (docs/card-protocol.md sections 5.11 and 6), an
        original named by reference in F37 (`rrn`) or by this batch's STAN in F61."""
        fields = self._base("0200", pcode, "90", stan=stan)
        if pan is not None:
            self._card(fields, pan, pin)
        if amount is not None:
            fields["4"] = f"{amount:012d}"
        fields |= {"25": "00", "49": "156"}
        if tlv:
            fields["48"] = codec.tlv_encode(tlv)
        if original_stan is not None:
            fields["61"] = codec.format_f61(codec.Field61(self.batch, original_stan, ""))
        if rrn is not None:
            fields["37"] = rrn
        return await self.financial(_ordered(fields))

    async def points_earn(
        self, pan: str, amount: int, basket: list[tuple[str, int]] | None = None
    ) -> Reply:
        """Points on a purchase paid some other way (cash, a bank card)."""
        return await self.private("900000", pan, amount, _basket(basket))

    async def points_return(self, pan: str, amount: int, rrn: str) -> Reply:
        """Goods of a purchase paid some other way come back: `amount` fen of the 900000
        whose reply carried `rrn` (F37). The reply's `PT` is the points taken back (below
        zero) and `PB` the card's points after. Like the 900000, not a batch line."""
        return await self.private("980000", pan, amount, rrn=rrn)

    async def points_redeem(self, pan: str, points: int, pin: str | None = None) -> Reply:
        """Points as payment: the reply's F4 is the money they paid."""
        return await self.private("910000", pan, None, [(codec.TLV_POINTS, str(points))], pin=pin)

    async def coupon(
        self,
        pcode: str,
        code: str,
        bill: int,
        pan: str | None = None,
        basket: list[tuple[str, int]] | None = None,
        *,
        sale: str = "",
        stan: str = "",
    ) -> Reply:
        """Coupon query (920000), reserve (950000) or redeem (930000) against a bill; the
        coupons of one sale share its `sale` number (stacking rules). A redeem may go under
        its reservation's `stan`."""
        tlv = [(codec.TLV_COUPON, code), *_basket(basket)]
        if sale:
            tlv.append((codec.TLV_SALE, sale))
        return await self.private(pcode, pan, bill, tlv, stan=stan)

    async def coupon_reverse(self, original_stan: str, code: str | None = None) -> Reply:
        """Release a reservation or undo a redemption of this batch (940000)."""
        tlv = [(codec.TLV_COUPON, code)] if code else None
        return await self.private("940000", None, None, tlv, original_stan=original_stan)

    async def service_redeem(self, pan: str, uses: int = 1, product: str = "") -> Reply:
        tlv = [(codec.TLV_USES, str(uses))]
        if product:
            tlv.append((codec.TLV_PRODUCT, product))
        return await self.private("960000", pan, None, tlv)

    async def manager_auth(
        self, pan: str, pin: str, bill: int, discount: int, reason: str
    ) -> Reply:
        """The manager's card and PIN authorize `discount` fen off a `bill` for `reason`."""
        tlv = [(codec.TLV_MANAGER_DISCOUNT, str(discount)), (codec.TLV_REASON, reason)]
        return await self.private("970000", pan, bill, tlv, pin=pin)

    def totals(self) -> codec.Totals:
        live = [x for x in self.lines if not x.voided]
        debit = [x.amount for x in live if x.kind == "purchase"]
        credit = [x.amount for x in live if x.kind in ("refund", "topup_confirm")]
        return codec.Totals(sum(debit), len(debit), sum(credit), len(credit))

    def _nothing_owed(self) -> None:
        """A batch is settled or uploaded only once its reversal and confirmation owed are
        done: they belong to it."""
        if self.pending_reversal is not None or self.pending_confirmation is not None:
            raise TerminalError("a reversal or a top-up confirmation is still owed: send it first")

    async def settle(self, totals: codec.Totals | None = None) -> Reply:
        self._nothing_owed()
        fields = self._base("0500", None, "00", "201")
        fields["48"] = codec.format_totals(totals or self.totals(), "0")
        fields["49"] = "156"
        reply = await self.exchange(_ordered(fields), mac=True)
        if reply.code == "00" and reply.fields["48"][30] == "1":
            self.close_batch()
        return reply

    async def upload(self) -> list[Reply]:
        """Batch upload after an unbalanced settlement: every live line, eight per message,
        then the closing message; the batch then closes."""
        self._nothing_owed()
        replies = []
        live = [x for x in self.lines if not x.voided and x.kind != "void"]
        for i in range(0, len(live), 8):
            fields = self._base("0320", None, "00", "201")
            fields["48"] = "".join(f"{x.stan}{x.amount:012d}" for x in live[i : i + 8])
            replies.append(await self.exchange(_ordered(fields), mac=True))
        fields = self._base("0320", None, "00", "202")
        fields["48"] = codec.format_totals(self.totals(), "0")
        replies.append(await self.exchange(_ordered(fields), mac=True))
        if replies[-1].code == "00":
            self.close_batch()
        return replies

    def restore_lines(self, lines: list[dict[str, object]]) -> None:
        """The batch lines a saved state holds (`cardcore pos` keeps them between runs)."""
        self.lines = [
            _Line(str(x["stan"]), str(x["kind"]), int(str(x["amount"])), bool(x["voided"]))
            for x in lines
        ]

    def close_batch(self) -> None:
        self.batch = codec.next_batch(self.batch)
        self.lines.clear()


def _basket(lines: list[tuple[str, int]] | None) -> list[tuple[str, str]]:
    return [(codec.TLV_BASKET_LINE, f"{department}={fen}") for department, fen in lines or ()]


def _same_request(owed: dict[str, str], fields: dict[str, str]) -> bool:
    """Whether `fields` is the request the reversal `owed` undoes, sent again (same batch and
    STAN: after a 91 or a 77): its MAC'd reply settles it, and a reversal first would make
    the host decline the resend (a request after its own reversal)."""
    if owed.get("11") != fields.get("11") or "60" not in owed or "60" not in fields:
        return False
    return codec.parse_f60(owed["60"]).batch == codec.parse_f60(fields["60"]).batch


def _ordered(fields: dict[str, str]) -> dict[str, str]:
    return {k: fields[k] for k in sorted(fields, key=lambda n: -1 if n == "t" else int(n))}


# Replies that approve: a MAC is required on them, and the batch counts them.
APPROVAL_CODES = frozenset({"00", "10"})
# What the gateway answers a MAC'd request without a MAC (docs/card-protocol.md section 8);
# any other code without one is forged. None of them settles the request.
UNMACD_CODES = frozenset({"13", "14", "30", "77", "91", "96", "A0"})
# A top-up confirmation is sent again, same STAN, until one of these (card-protocol 5.9).
CONFIRM_DONE_CODES = frozenset({"00", "12", "25", "64", "94"})
# A reversal's reason (its F39): no reply, a reply whose MAC did not verify, the cashier's.
REVERSAL_NO_REPLY = "98"
REVERSAL_BAD_MAC = "A0"
REVERSAL_CANCELLED = "06"

RESPONSE_TEXT = {
    "00": "approved",
    "03": "invalid merchant",
    "10": "partial approval",
    "12": "invalid transaction",
    "13": "invalid amount",
    "14": "invalid card",
    "25": "original not found",
    "30": "format error",
    "40": "function not supported",
    "41": "lost card, pick up",
    "51": "insufficient funds",
    "54": "expired card",
    "57": "not permitted",
    "55": "incorrect PIN",
    "61": "exceeds amount limit",
    "62": "restricted card",
    "64": "original amount incorrect",
    "75": "PIN tries exceeded",
    "77": "sign on again",
    "91": "slow down",
    "94": "duplicate transmission",
    "96": "system malfunction",
    "97": "terminal not registered",
    "99": "PIN format error",
    "A0": "MAC error",
    "C1": "coupon unknown",
    "C2": "coupon already used",
    "C3": "coupon expired",
}


def describe(reply: Reply) -> str:
    """One readable line for a reply: code, meaning and what came with it."""
    f = reply.fields
    parts = [f"{reply.code} {RESPONSE_TEXT.get(reply.code, '')}".rstrip()]
    if "4" in f:
        parts.append(f"amount {money(int(f['4']))}")
    balance = reply.balance
    if balance is not None:
        parts.append(f"balance {money(balance)}")
    remainder = reply.remainder
    if remainder is not None:
        parts.append(f"still due {money(remainder)}")
    discount = reply.discount_bp
    if discount is not None:
        parts.append(f"member discount {money(discount)} %")
    tlv = reply.tlv
    for tag, label in (
        (codec.TLV_POINTS, "points"),
        (codec.TLV_POINTS_BALANCE, "points balance"),
        (codec.TLV_USES_LEFT, "uses left"),
    ):
        if tag in tlv:
            parts.append(f"{label} {tlv[tag]}")
    for tag, label in ((codec.TLV_DISCOUNT, "discount"), (codec.TLV_FORFEITED, "forfeited")):
        if tag in tlv:
            parts.append(f"{label} {money(int(tlv[tag]))}")
    for tag, label in ((codec.TLV_CAMPAIGN, "campaign"), (codec.TLV_REFUSAL, "refused by")):
        if tag in tlv:
            parts.append(f"{label} {tlv[tag]}")
    parts += [f"coupon earned {code}" for code in reply.rewards]
    if "37" in f:
        parts.append(f"rrn {f['37']}")
    if "60" in f:
        parts.append(f"batch {codec.parse_f60(f['60']).batch}")
    if f.get("t") == "0510" and "48" in f:
        flag = f["48"][30]
        parts.append("balanced" if flag == "1" else "not balanced: upload follows")
    parts.append(f"stan {f.get('11', '')}")
    if reply.processing == codec.PROCESSING_SIGN_ON:
        parts.append("(host asks for sign-on)")
    return ", ".join(parts)


def money(fen: int) -> str:
    """Fen as yuan for people: 2350 -> '23.50' (integers only)."""
    sign = "-" if fen < 0 else ""
    yuan, cents = divmod(abs(fen), 100)
    return f"{sign}{yuan}.{cents:02d}"
