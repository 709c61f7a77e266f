"""`cardcore pos` without a gateway: what --raw shows of a frame, and what the reference
terminal keeps when a request cannot be encoded."""

from __future__ import annotations

import pytest

from cardcore.cards.model import mask_pan
from cardcore.frontend_gateway import codec
from cardcore.frontend_gateway.security import WorkingKeys
from cardcore.frontend_gateway.terminal import HEADER, TPDU, PosTerminal
from cardcore.pos_commands import frame_text

PAN = "6288880000000013"
PIN_BLOCK = "0123456789ABCDEF0123456789ABCDEF"
KEYS = "A1" * 56


def _frame(fields: dict[str, str]) -> bytes:
    return codec.pack_frame(TPDU, HEADER, codec.encode(fields))


def test_raw_frames_mask_the_card_number_and_star_the_pin_block() -> None:
    fields = {"t": "0200", "2": PAN, "3": "970000", "4": "000000030000", "11": "000007",
              "41": "DEMO0001", "42": "DEMO00000000001", "52": PIN_BLOCK}  # fmt: skip
    frame = _frame(fields)
    assert PAN in frame.hex().upper() and PIN_BLOCK in frame.hex().upper()

    shown = frame_text(frame)
    assert PAN not in shown and mask_pan(PAN) in shown
    assert PIN_BLOCK not in shown and "*" * len(PIN_BLOCK) in shown
    assert len(shown) == len(frame.hex())  # every other byte is there, where it was


def test_raw_frames_star_the_working_keys_of_a_sign_on_reply() -> None:
    fields = {"t": "0810", "11": "000001", "39": "00", "41": "DEMO0001", "62": KEYS}
    shown = frame_text(_frame(fields))
    assert KEYS not in shown and "*" * len(KEYS) in shown


def test_raw_frames_that_do_not_decode_show_only_their_length_negative() -> None:
    frame = _frame({"t": "0200", "2": PAN, "11": "000001"})[:-3]  # cut inside F11
    assert frame_text(frame) == f"({len(frame)} bytes that do not decode)"


async def test_a_request_that_cannot_be_encoded_is_neither_sent_nor_owed() -> None:
    terminal = PosTerminal("127.0.0.1", 9, "DEMO0001", "DEMO00000000001", bytes(16))
    terminal.keys = WorkingKeys(bytes(16), bytes(range(16)))
    with pytest.raises(ValueError, match="field 4"):
        await terminal.purchase(PAN, -5)  # F4 cannot carry it
    assert terminal.pending_reversal is None  # a reversal of it would never encode either
    assert terminal.last_request is None and terminal.last_sent == b""
