"""`cardcore pos` without a gateway: what --raw shows of a frame, and what the reference
terminal keeps when a request cannot be encoded."""

from __future__ import annotations

import pytest
from aiohttp import web

from cardcore.cards.model import mask_pan
from cardcore.config import Config
from cardcore.frontend_gateway import codec
from cardcore.frontend_gateway.security import WorkingKeys
from cardcore.frontend_gateway.terminal import HEADER, TPDU, PosTerminal
from cardcore.pos_commands import CommandError, frame_text, host_post

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


@pytest.mark.parametrize(
    ("status", "content_type", "text", "says"),
    [
        (502, "text/html", "<html>Bad Gateway</html>", "502, not a cardcore answer (text/html)"),
        (200, "application/json", "[1, 2]", "200, not a cardcore answer"),
        (201, "application/json", "{}", "201, an answer without 'cards'"),
        (409, "application/json", '{"error": "busy"}', "409 None: None"),
    ],
)
async def test_the_bootstrap_commands_name_an_answer_that_is_not_the_hosts(
    status: int, content_type: str, text: str, says: str
) -> None:
    """`cardcore terminal add` and `cardcore card issue` behind a proxy that answered its own
    page (or an answer of another shape) failed with a traceback (JSONDecodeError,
    KeyError): now one error line names the status and what came back."""

    async def answer(request: web.Request) -> web.Response:
        return web.Response(status=status, content_type=content_type, text=text)

    app = web.Application()
    app.router.add_post("/internal/v1/cards", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        with pytest.raises(CommandError) as refused:
            await host_post(Config(), f"http://127.0.0.1:{port}", "/internal/v1/cards", {}, "cards")
    finally:
        await runner.cleanup()
    assert says in str(refused.value)
