"""The reference terminal believes an unMAC'd reply only as far as it is harmless: one on the
line between terminal and gateway can swap the gateway's MAC'd approval for an unMAC'd 77,
91, A0, 13, 14 or 30, which the gateway sends unMAC'd when it did nothing. The terminal keeps
the request's reversal owed and sends it before the next transaction, so the money the host
took comes back (before, it dropped the reversal and the card stayed debited)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cardcore.cards.model import Kind
from cardcore.frontend_gateway import codec, security
from cardcore.frontend_gateway.processor import Processor
from cardcore.frontend_gateway.saf import ReversalQueue
from cardcore.frontend_gateway.security import KeyMode
from cardcore.frontend_gateway.terminal import HEADER, TPDU, PosTerminal, Reply, _ordered
from cardcore.metrics import Metrics
from tests.unit.test_gateway_validation import KEK, MID, PAN, TID, TMK, Host

pytestmark = pytest.mark.asyncio


async def _signed_on(processor: Processor) -> PosTerminal:
    terminal = PosTerminal("unused", 0, TID, MID, TMK, KeyMode.AES)
    reply = await processor.handle(codec.encode(terminal._base("0800", None, "00", "005")))
    assert reply is not None
    keys = codec.decode(reply.body)["62"]
    terminal.keys = security.read_working_keys(KeyMode.AES, TMK, bytes.fromhex(keys))
    return terminal


def _wired(terminal: PosTerminal, processor: Processor, forged: str | None) -> list[dict[str, str]]:
    """The terminal's frames go straight to `processor`; with `forged`, the line swaps the
    first reply for an unMAC'd one with that code. The replies the gateway really gave."""
    frames: list[bytes] = []
    genuine: list[dict[str, str]] = []

    async def send_raw(frame: bytes) -> None:
        frames.append(frame)

    async def read_reply() -> Reply:
        body = codec.split_frame(frames[-1][codec.LENGTH_BYTES :]).body
        answered = await processor.handle(body)
        assert answered is not None
        genuine.append(codec.decode(answered.body))
        fields = dict(genuine[-1])
        if forged is not None and len(genuine) == 1:
            fields = {k: v for k, v in fields.items() if k not in ("38", "54", "64")}
            fields["39"] = forged
        header = codec.reply_header(HEADER, processing=0)
        raw = codec.pack_frame(codec.reply_tpdu(TPDU), header, codec.encode(fields))
        return Reply(codec.decode(codec.encode(fields)), 0, raw)

    terminal.send_raw = send_raw  # type: ignore[method-assign]
    terminal.read_reply = read_reply  # type: ignore[method-assign]
    return genuine


@pytest.mark.parametrize("forged", ["77", "91", "A0", "13", "14", "30"])
async def test_an_unmacd_refusal_forged_over_an_approval_leaves_the_reversal_owed(
    tmp_path: Path, forged: str
) -> None:
    host = Host()
    saf = ReversalQueue(tmp_path / "saf.jsonl")
    saf.open()
    processor = Processor(host, saf, KEK, Metrics())
    terminal = await _signed_on(processor)
    genuine = _wired(terminal, processor, forged)
    try:
        seen = await terminal.purchase(PAN, 10_000)
        assert (seen.code, genuine[0]["39"]) == (forged, "00")  # the host took the money
        assert terminal.pending_reversal is not None
        next_sale = await terminal.purchase(PAN, 500)
        assert next_sale.code == "00"
        assert [r.kind for r in host.seen] == [Kind.PURCHASE, Kind.REVERSE, Kind.PURCHASE]
        assert host.seen[1].stan == host.seen[0].stan  # the forged-over sale is undone
    finally:
        await saf.close()


async def test_the_same_request_sent_again_goes_before_its_reversal(tmp_path: Path) -> None:
    """After a 91 the terminal sends the same request again (same batch and STAN): its MAC'd
    reply settles it. A reversal sent first would make the host decline the resend."""
    host = Host()
    saf = ReversalQueue(tmp_path / "saf.jsonl")
    saf.open()
    processor = Processor(host, saf, KEK, Metrics())
    terminal = await _signed_on(processor)
    _wired(terminal, processor, None)
    try:
        fields = terminal._base("0200", "000000", "22")
        terminal._card(fields, PAN, None)
        fields = _ordered(fields | {"4": f"{1_000:012d}", "25": "00", "49": "156"})
        terminal.pending_reversal = {**fields, "t": "0400", "39": "98"}  # as after a 91
        assert (await terminal.financial(fields)).code == "00"
        assert [r.kind for r in host.seen] == [Kind.PURCHASE]
        assert terminal.pending_reversal is None
    finally:
        await saf.close()
