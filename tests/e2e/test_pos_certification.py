"""POS certification: what a terminal vendor runs against the host before going live.

Everything goes end to end over real TCP to a real `cardcore serve` process (with CARDCORE_KEK
set, so it runs the terminal gateway): terminals are registered and cards issued through the
internal HTTP API, then driven with the reference terminal (`CertTerminal`, which checks
every reply strictly: MTI + 10, echoed F3/F11/F41/F42, and a MAC under the session MAK).

One server per database for the whole module. The core flows run on SQLite and PostgreSQL;
the rest on SQLite. The last test stops both servers, runs `cardcore ledger verify` on each
database and scans each server's stderr (logged at DEBUG, so the scan sees the most) for every
card number, PIN and key of the run.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest

from cardcore.frontend_gateway import codec, security
from cardcore.frontend_gateway.security import KeyMode
from cardcore.frontend_gateway.terminal import NET_CODE_OF_MODE, PosTerminal, TerminalError
from tests.e2e.pos_support import (
    CardcoreServer,
    Kit,
    amount12,
    bad_luhn,
    message,
    new_tid,
    ordered,
    purchase_fields,
    random_pin_block,
    reply_mac_ok,
    reversal_of,
    server_fixtures,
    unissued_pan,
)
from tests.helpers import run_cardcore, sql_execute, sql_rows

pytestmark = pytest.mark.timeout(120)

MODES = (KeyMode.AES, KeyMode.TDES)
# Private requests (section 5.11) without the data they need: F48 TLV PT, CP, MD; F61.
NEEDS_DATA = ("910000", "920000", "930000", "940000", "950000", "970000")


# --- servers and kits ----------------------------------------------------------------------


sqlite_server, postgresql_server, server, kit = server_fixtures("pos-cert")


@pytest.fixture
async def sqlite_kit(sqlite_server: CardcoreServer) -> AsyncIterator[Kit]:
    async with Kit(sqlite_server, aiohttp.ClientSession()) as k:
        yield k


def batch_of(reply_fields: dict[str, str]) -> str:
    return codec.parse_f60(reply_fields["60"]).batch


def upload(term: PosTerminal, net: str, f48: str) -> dict[str, str]:
    """A batch-upload message: 60.3 201 (up to eight lines) or 202 (the end, with totals)."""
    fields = message(term, "0320", None, "00", net=net)
    fields["48"] = f48
    return ordered(fields)


# --- 1. sign-on ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES, ids=str)
async def test_sign_on_issues_working_keys_under_the_tmk_and_the_batch(
    kit: Kit, mode: KeyMode
) -> None:
    reg = await kit.register(mode)
    assert reg.kcv == security.check_value(mode, reg.tmk).hex().upper()
    term = kit.terminal_for(reg)
    term.batch = "000777"  # whatever the terminal thinks, the host's batch is adopted

    reply = await term.sign_on()

    assert reply.code == "00", reply.fields
    assert reply.fields["t"] == "0810"
    f60 = codec.parse_f60(reply.fields["60"])
    assert f60.batch == "000001"
    assert f60.net_code == NET_CODE_OF_MODE[mode] == {KeyMode.AES: "005", KeyMode.TDES: "003"}[mode]
    assert term.batch == "000001"
    payload = bytes.fromhex(reply.fields["62"])
    assert len(payload) == 2 * (security.WRAPPED_KEY_BYTES[mode] + security.KCV_BYTES)
    keys = security.read_working_keys(mode, reg.tmk, payload)  # both check values verify
    assert keys.pik != keys.mak
    with pytest.raises(security.SecurityError):  # under another master key they do not
        security.read_working_keys(mode, security.new_key(mode), payload)

    # The keys work: a MAC'd inquiry is answered, MAC'd under the new MAK.
    card = await kit.card(5_000)
    inquiry = await term.inquiry(card.pan)
    assert inquiry.code == "00", inquiry.fields
    assert inquiry.balance == 5_000
    assert reply_mac_ok(mode, keys.mak, inquiry)

    # Signing on again issues new keys; the old MAK no longer answers.
    again = await term.sign_on()
    assert again.code == "00"
    fresh = security.read_working_keys(mode, reg.tmk, bytes.fromhex(again.fields["62"]))
    assert fresh.mak != keys.mak
    assert (await term.inquiry(card.pan)).code == "00"


async def test_sign_on_refusals(kit: Kit) -> None:
    aes = await kit.register(KeyMode.AES)
    tdes = await kit.register(KeyMode.TDES)

    # The wrong key mode: an AES terminal asking for 3DES keys (60.3 003), and the reverse: 12.
    for reg, asked in ((aes, KeyMode.TDES), (tdes, KeyMode.AES)):
        wrong = kit.terminal_for(reg, mode=asked)
        reply = await wrong.sign_on()
        assert reply.code == "12", reply.fields
        assert "62" not in reply.fields
        assert wrong.keys is None

    # An unknown terminal: 97.
    stranger = kit.terminal_for(aes)
    stranger.tid = new_tid()
    reply = await stranger.sign_on()
    assert reply.code == "97", reply.fields
    assert "62" not in reply.fields

    # The right terminal with another merchant id (F42): 12.
    other_mid = kit.terminal_for(aes)
    other_mid.mid = "MOTHERMERCHANT1"
    reply = await other_mid.sign_on()
    assert reply.code == "12", reply.fields
    assert "62" not in reply.fields

    # None of that harmed the real terminals.
    for reg in (aes, tdes):
        assert (await kit.terminal_for(reg).sign_on()).code == "00"


async def test_financial_request_with_another_merchant_id_is_refused(sqlite_kit: Kit) -> None:
    kit = sqlite_kit
    term = await kit.terminal()
    card = await kit.card(10_000)
    account = await kit.account(card.account_id)
    real_mid = term.mid
    term.mid = "MOTHERMERCHANT1"
    reply = await term.purchase(card.pan, 1_000)
    assert reply.code == "03", reply.fields  # F42 is not the terminal's merchant id
    assert await kit.account(card.account_id) == account
    assert await kit.available(card.account_id) == 10_000
    term.mid = real_mid
    assert (await term.purchase(card.pan, 1_000)).code == "00"


# --- 2. sign-off and echo -------------------------------------------------------------------


async def test_sale_after_sign_off_is_refused_with_77_and_sign_on_requested(
    sqlite_kit: Kit,
) -> None:
    kit = sqlite_kit
    term = await kit.terminal()
    card = await kit.card(10_000)
    echo = await term.echo()
    assert echo.code == "00", echo.fields
    assert echo.fields["t"] == "0830"
    assert codec.parse_f60(echo.fields["60"]).net_code == "301"
    assert (await term.purchase(card.pan, 100)).code == "00"

    keys = term.keys
    off = await term.sign_off()
    assert off.code == "00", off.fields
    assert off.fields["t"] == "0830"
    term.keys = keys  # a terminal that goes on with the keys of its closed session
    await _refused_until_sign_on(term, card.pan)
    assert await kit.available(card.account_id) == 9_900
    assert (await term.echo()).code == "00"  # echo needs no session

    assert (await term.sign_on()).code == "00"
    sale = await term.purchase(card.pan, 200)  # the reversal owed goes first: 00, harmless
    assert sale.code == "00", sale.fields
    assert sale.processing == codec.PROCESSING_NONE
    assert sale.balance == 9_700


async def _refused_until_sign_on(term: PosTerminal, pan: str) -> None:
    """A sale without a session is answered 77, unMAC'd: that settles nothing (it could be
    forged over an approval), so its reversal stays owed, and the next sale waits behind
    it until the terminal signs on again."""
    sale = await term.purchase(pan, 100)
    assert (sale.code, sale.processing) == ("77", codec.PROCESSING_SIGN_ON), sale.fields
    assert "64" not in sale.fields and term.pending_reversal is not None
    with pytest.raises(TerminalError, match=r"a reversal is still owed \(answered 77\)"):
        await term.purchase(pan, 100)


# --- 3. purchase and its declines -----------------------------------------------------------


@pytest.mark.parametrize("mode", MODES, ids=str)
async def test_purchase_approved_and_declines(kit: Kit, mode: KeyMode) -> None:
    term = await kit.terminal(mode)
    card = await kit.card(10_000)

    sale = await term.purchase(card.pan, 2_500)
    assert sale.code == "00", sale.fields
    assert sale.balance == 7_500
    assert sale.fields["54"] == "0002156C000000007500"  # account 00, available 02, CNY
    rrn = sale.fields["37"]
    assert len(rrn) == 12 and rrn.isdigit(), rrn
    assert len(sale.fields["38"]) == 6, sale.fields
    other = await term.purchase(card.pan, 500)
    assert other.code == "00"
    assert other.fields["37"] != rrn
    assert other.balance == 7_000
    account = await kit.account(card.account_id)
    assert account["debits_posted"] == 3_000

    # 51: more than the balance; nothing moves.
    declined = await term.purchase(card.pan, 7_001)
    assert declined.code == "51", declined.fields
    inquiry = await term.inquiry(card.pan)
    assert inquiry.code == "00"
    assert inquiry.balance == 7_000
    assert await kit.account(card.account_id) == account

    # 14: a card nobody issued, and an issued card's number with a wrong check digit.
    assert (await term.purchase(unissued_pan(), 100)).code == "14"
    assert (await term.purchase(bad_luhn(card.pan), 100)).code == "14"
    # 13: zero amount.
    assert (await term.purchase(card.pan, 0)).code == "13"
    # 30: a purchase without its amount (F4).
    no_amount = message(term, "0200", "000000", "22", pan=card.pan)
    assert (await term.send(no_amount)).code == "30"
    # 12: a processing code the host does not know.
    unknown = message(term, "0200", "010000", "22", pan=card.pan, amount=100)
    assert (await term.send(unknown)).code == "12"
    # 30: private requests without the F48 tags (or F61) they need.
    for pcode in NEEDS_DATA:
        reply = await term.private(pcode, card.pan, 100)
        assert reply.code == "30", (pcode, reply.fields)

    assert await kit.account(card.account_id) == account


# --- 4. every reply echoes and is MAC'd -----------------------------------------------------


@pytest.mark.parametrize("mode", MODES, ids=str)
async def test_every_reply_echoes_the_request_and_its_mac_verifies(
    sqlite_kit: Kit, mode: KeyMode
) -> None:
    kit = sqlite_kit
    term = await kit.terminal(mode)
    card = await kit.card(10_000)
    assert term.keys is not None
    mak = term.keys.mak
    codes: list[str] = []

    async def send(fields: dict[str, str]) -> dict[str, str]:
        reply = await term.exchange(fields, mac=True)
        f = reply.fields
        assert f["t"] == f"{int(fields['t']) + 10:04d}", (fields["t"], f)
        for name in ("3", "11", "41", "42"):
            assert f.get(name) == fields.get(name), (name, fields, f)
        assert "64" in f, f
        assert reply_mac_ok(mode, mak, reply), f
        codes.append(reply.code)
        return f

    pan = card.pan
    await send(message(term, "0200", "310000", "01", pan=pan))
    sale = purchase_fields(term, pan, 1_000)
    rrn = (await send(sale))["37"]
    await send(purchase_fields(term, pan, 1_000_000))
    await send(purchase_fields(term, unissued_pan(), 100))
    await send(purchase_fields(term, pan, 0))
    await send(message(term, "0200", "000000", "22", pan=pan))
    await send(message(term, "0200", "010000", "22", pan=pan, amount=100))
    await send(message(term, "0200", "900000", "90", pan=pan, amount=100))
    second = purchase_fields(term, pan, 300)
    await send(second)
    original = term.batch + second["11"]
    await send(message(term, "0200", "200000", "23", pan=pan, amount=300, **{"61": original}))
    await send(message(term, "0200", "200000", "23", pan=pan, amount=300, **{"61": original}))
    await send(
        message(term, "0200", "200000", "23", pan=pan, amount=1, **{"61": term.batch + "999990"})
    )
    refund = {"37": rrn, "61": term.batch + sale["11"]}
    await send(message(term, "0220", "200000", "25", pan=pan, amount=400, **refund))
    topup = message(term, "0200", "630000", "48", pan=pan, amount=700)
    await send(topup)
    confirm = {"61": term.batch + topup["11"]}
    await send(message(term, "0220", "630000", "49", amount=700, **confirm))
    lost = purchase_fields(term, pan, 50)
    await send(reversal_of(lost))
    await send(lost)

    assert codes == [
        "00",  # inquiry
        "00",  # purchase
        "51",  # insufficient funds
        "14",  # unknown card
        "13",  # zero amount
        "30",  # no amount
        "12",  # unknown processing code
        "57",  # points earn on a card of no points program (refusal points_no_program)
        "00",  # purchase
        "00",  # void
        "12",  # a second void of it: already voided
        "25",  # void of an unknown original
        "00",  # refund
        "00",  # top-up
        "00",  # top-up confirmation
        "00",  # reversal of a request never seen
        "12",  # the late original: it arrived after its own reversal
    ], codes
    assert await kit.available(card.account_id) == 10_000 - 1_000 + 400 + 700


# --- 5. MAC errors ---------------------------------------------------------------------------


async def test_wrong_macs_answer_a0_and_three_in_a_row_force_sign_on(sqlite_kit: Kit) -> None:
    kit = sqlite_kit
    term = await kit.terminal()
    card = await kit.card(10_000)

    async def bad() -> int:
        reply = await term.send_bad_mac(purchase_fields(term, card.pan, 100))
        assert reply.code == "A0", reply.fields
        assert reply.fields["t"] == "0210"
        return reply.processing

    assert [await bad(), await bad()] == [codec.PROCESSING_NONE] * 2
    good = await term.purchase(card.pan, 1_000)  # a good MAC resets the count
    assert good.code == "00", good.fields
    assert [await bad(), await bad()] == [codec.PROCESSING_NONE] * 2
    assert await bad() == codec.PROCESSING_SIGN_ON  # the third in a row

    # The session is gone: even well MAC'd sales are refused until the terminal signs on.
    await _refused_until_sign_on(term, card.pan)
    assert await kit.available(card.account_id) == 9_000  # no bad-MAC sale moved money

    assert (await term.sign_on()).code == "00"
    sale = await term.purchase(card.pan, 100)
    assert sale.code == "00", sale.fields
    assert sale.balance == 8_900


# --- 6. lost replies, reversals, retransmissions -------------------------------------------


async def test_lost_reply_then_reversal_gives_the_money_back_exactly_once(kit: Kit) -> None:
    term = await kit.terminal()
    card = await kit.card(10_000)
    sale = purchase_fields(term, card.pan, 3_000)
    await term.send_and_drop(sale)  # no reply: the line dropped
    await kit.wait_available(card.account_id, 7_000)  # the host did take it

    reversal = reversal_of(sale)
    assert reversal["39"] == "98"
    reply = await term.send(reversal)
    assert reply.code == "00", reply.fields
    assert await kit.available(card.account_id) == 10_000
    after = await kit.account(card.account_id)

    again = await term.send(reversal)  # a duplicate reversal: 00, and nothing moves
    assert again.code == "00", again.fields
    assert await kit.account(card.account_id) == after

    # The terminal's own path: a lost reply, the reversal before the next sale.
    lost = purchase_fields(term, card.pan, 2_000)
    await term.send_and_drop(lost)
    term.owe_reversal(reversal_of(lost))
    next_sale = await term.purchase(card.pan, 500)
    assert next_sale.code == "00", next_sale.fields
    assert term.pending_reversal is None
    assert next_sale.balance == 9_500
    assert await kit.available(card.account_id) == 9_500
    settled = await term.settle()  # the host counts only the 500 too
    assert settled.fields["48"][30] == "1", settled.fields
    assert codec.parse_totals(settled.fields["48"]) == codec.Totals(500, 1, 0, 0)


async def test_reversal_before_its_original_declines_the_late_original(kit: Kit) -> None:
    term = await kit.terminal()
    card = await kit.card(10_000)
    before = await kit.account(card.account_id)
    sale = purchase_fields(term, card.pan, 2_000)  # built, sent only after its reversal

    reply = await term.send(reversal_of(sale))
    assert reply.code == "00", reply.fields
    late = await term.send(sale)
    assert late.code == "12", late.fields  # arrived after its own reversal (section 10)
    assert await kit.account(card.account_id) == before
    assert (await term.send(sale)).code == "12"  # and stays declined
    assert await kit.account(card.account_id) == before
    settled = await term.settle(codec.Totals(0, 0, 0, 0))
    assert settled.fields["48"][30] == "1", settled.fields


async def test_retransmission_is_answered_once_and_a_changed_one_is_94(kit: Kit) -> None:
    term = await kit.terminal()
    card = await kit.card(10_000)
    sale = purchase_fields(term, card.pan, 1_500)

    first = await term.send(sale)
    assert first.code == "00", first.fields
    again = await term.send(sale)  # same STAN, same content: the same answer
    assert again.code == "00", again.fields
    for name in ("37", "38", "54"):
        assert again.fields[name] == first.fields[name], name
    assert await kit.available(card.account_id) == 8_500
    account = await kit.account(card.account_id)

    changed = {**sale, "4": amount12(1_600)}  # same STAN, another amount
    reply = await term.send(changed)
    assert reply.code == "94", reply.fields
    assert await kit.account(card.account_id) == account

    too_much = purchase_fields(term, card.pan, 9_000)  # a decline is answered the same way
    assert (await term.send(too_much)).code == "51"
    assert (await term.send(too_much)).code == "51"
    assert await kit.account(card.account_id) == account


# --- 7. void ---------------------------------------------------------------------------------


async def test_void(kit: Kit) -> None:
    term = await kit.terminal()
    card = await kit.card(10_000)
    sale = await term.purchase(card.pan, 4_000)
    assert sale.code == "00"
    stan = term.stan

    void = await term.void(card.pan, 4_000, stan)
    assert void.code == "00", void.fields
    assert void.balance == 10_000
    assert await kit.available(card.account_id) == 10_000
    account = await kit.account(card.account_id)

    second = await term.void(card.pan, 4_000, stan)
    assert second.code == "12", second.fields  # already voided
    assert await kit.account(card.account_id) == account

    assert (await term.void(card.pan, 100, "999990")).code == "25"

    assert (await term.purchase(card.pan, 1_000)).code == "00"
    wrong = await term.void(card.pan, 999, term.stan)
    assert wrong.code == "64", wrong.fields
    assert await kit.available(card.account_id) == 9_000


async def test_reversal_of_a_void_whose_reply_was_lost_reinstates_the_sale(kit: Kit) -> None:
    term = await kit.terminal()
    card = await kit.card(10_000)
    assert (await term.purchase(card.pan, 3_000)).code == "00"
    original = term.batch + term.stan
    void = message(term, "0200", "200000", "23", pan=card.pan, amount=3_000, **{"61": original})
    await term.send_and_drop(void)  # the void's reply is lost
    await kit.wait_available(card.account_id, 10_000)  # the host did void it

    reply = await term.send(reversal_of(void))
    assert reply.code == "00", reply.fields
    assert await kit.available(card.account_id) == 7_000  # the sale stands again
    settled = await term.settle()  # and both sides count it
    assert settled.fields["48"][30] == "1", settled.fields


# --- 8. refund -------------------------------------------------------------------------------


async def test_partial_refunds_in_a_later_batch_never_exceed_the_original(kit: Kit) -> None:
    term = await kit.terminal()
    card = await kit.card(20_000)
    sale = await term.purchase(card.pan, 10_000)
    assert sale.code == "00"
    rrn, batch, stan = sale.fields["37"], term.batch, term.stan
    settled = await term.settle()
    assert settled.code == "00"
    assert settled.fields["48"][30] == "1", settled.fields
    assert term.batch != batch

    async def refund(amount: int) -> str:
        reply = await term.refund(card.pan, amount, rrn, batch, stan)
        return reply.code

    assert await refund(4_000) == "00"
    assert await kit.available(card.account_id) == 14_000
    assert await refund(5_000) == "00"
    assert await kit.available(card.account_id) == 19_000
    account = await kit.account(card.account_id)
    assert await refund(2_000) == "61"  # 9,000 of 10,000 refunded: 2,000 is too much
    assert await kit.account(card.account_id) == account
    assert await refund(1_000) == "00"  # exactly the rest
    assert await kit.available(card.account_id) == 20_000
    account = await kit.account(card.account_id)
    assert await refund(1) == "61"  # fully refunded: nothing is left (5.8)
    assert await kit.account(card.account_id) == account
    settled = await term.settle()  # three refunds, credits of the new batch
    assert codec.parse_totals(settled.fields["48"]) == codec.Totals(0, 0, 10_000, 3)
    assert settled.fields["48"][30] == "1", settled.fields


# --- 9. top-up -------------------------------------------------------------------------------


async def test_top_up_counts_only_once_confirmed_and_a_reversed_one_leaves_nothing(
    kit: Kit,
) -> None:
    term = await kit.terminal()
    card = await kit.card(1_000)

    topup = await term.topup(card.pan, 5_000)
    assert topup.code == "00", topup.fields
    topup_stan = term.stan
    assert topup.balance == 1_000
    held = await kit.account(card.account_id)
    assert held["credits_pending"] == 5_000
    assert held["credits_posted"] == 1_000
    inquiry = await term.inquiry(card.pan)
    assert inquiry.balance == 1_000

    confirm = await term.topup_confirm(topup_stan, 5_000)
    assert confirm.code == "00", confirm.fields
    confirmed = await kit.account(card.account_id)
    assert confirmed["credits_pending"] == 0
    assert confirmed["credits_posted"] == 6_000
    assert (await term.inquiry(card.pan)).balance == 6_000

    # A top-up reversed instead of confirmed.
    second = message(term, "0200", "630000", "48", pan=card.pan, amount=2_000)
    assert (await term.send(second)).code == "00"
    assert (await kit.account(card.account_id))["credits_pending"] == 2_000
    reply = await term.send(reversal_of(second))
    assert reply.code == "00", reply.fields
    reversed_ = await kit.account(card.account_id)
    for name in ("credits_posted", "debits_posted", "credits_pending", "debits_pending"):
        assert reversed_[name] == confirmed[name], (name, reversed_, confirmed)
    late = message(term, "0220", "630000", "49", amount=2_000, **{"61": term.batch + second["11"]})
    late_reply = await term.send(late)
    assert late_reply.code == "12", late_reply.fields  # the hold was reversed
    assert await kit.account(card.account_id) == reversed_
    after = await kit.account(card.account_id)
    assert after["credits_posted"] == 6_000
    assert after["credits_pending"] == 0
    settled = await term.settle()  # the confirmed top-up is the batch's one credit
    assert codec.parse_totals(settled.fields["48"]) == codec.Totals(0, 0, 5_000, 1)
    assert settled.fields["48"][30] == "1", settled.fields


async def test_top_up_confirmation_with_another_amount_is_refused(sqlite_kit: Kit) -> None:
    kit = sqlite_kit
    term = await kit.terminal()
    card = await kit.card(1_000)
    assert (await term.topup(card.pan, 2_000)).code == "00"
    stan = term.stan
    held = await kit.account(card.account_id)

    wrong = await term.topup_confirm(stan, 5_000)
    assert wrong.code == "64", wrong.fields  # another amount than the top-up's
    assert await kit.account(card.account_id) == held
    assert (await term.topup_confirm(stan, 2_000)).code == "00"
    assert await kit.available(card.account_id) == 3_000


# --- 10. settlement ---------------------------------------------------------------------------


async def test_balanced_settlement_closes_the_batch(kit: Kit) -> None:
    term = await kit.terminal()
    card = await kit.card(50_000)
    assert (await term.purchase(card.pan, 1_000)).code == "00"
    assert (await term.purchase(card.pan, 2_000)).code == "00"
    assert (await term.void(card.pan, 2_000, term.stan)).code == "00"
    assert term.totals() == codec.Totals(1_000, 1, 0, 0)
    old = term.batch

    settled = await term.settle()
    assert settled.code == "00", settled.fields
    assert settled.fields["t"] == "0510"
    assert settled.fields["48"][30] == "1"
    assert codec.parse_totals(settled.fields["48"]) == codec.Totals(1_000, 1, 0, 0)
    assert term.batch == codec.next_batch(old)

    # Sign-on hands out the next batch; the old one is closed.
    stale = await term.sign_on()
    assert batch_of(stale.fields) == codec.next_batch(old)
    term.batch = old
    sale = await term.purchase(card.pan, 100)
    assert sale.code == "77", sale.fields
    assert sale.processing == codec.PROCESSING_SIGN_ON
    term.batch = codec.next_batch(old)
    assert (await term.purchase(card.pan, 100)).code == "00"
    assert await kit.available(card.account_id) == 50_000 - 1_100


async def test_unbalanced_settlement_then_batch_upload_closes_the_batch(
    kit: Kit, server: CardcoreServer
) -> None:
    term = await kit.terminal()
    card = await kit.card(50_000)
    assert (await term.purchase(card.pan, 1_100)).code == "00"
    first = term.stan
    assert (await term.purchase(card.pan, 2_200)).code == "00"
    second = term.stan
    old = term.batch

    wrong = codec.Totals(3_400, 3, 0, 0)  # the terminal counts wrong
    settled = await term.settle(wrong)
    assert settled.code == "00", settled.fields
    assert settled.fields["48"][30] == "2"
    assert codec.parse_totals(settled.fields["48"]) == codec.Totals(3_300, 2, 0, 0)
    assert term.batch == old  # still open: the upload follows

    lines = first + amount12(1_100) + second + amount12(2_300) + "999990" + amount12(100)
    detail = await term.send_macd(upload(term, "201", lines))
    assert detail.code == "00", detail.fields
    assert detail.fields["t"] == "0330"
    assert detail.fields.get("48") == second + "999990"  # what the host does not have
    closing = await term.send_macd(upload(term, "202", codec.format_totals(wrong, "0")))
    assert closing.code == "00", closing.fields
    term.close_batch()

    rows = await sql_rows(
        server.db_url,
        "SELECT batch, balanced FROM pos_settlements WHERE tid = :tid",
        tid=term.tid,
    )
    assert [(r["batch"], bool(r["balanced"])) for r in rows] == [(old, False)]

    term.batch = old
    stale = await term.purchase(card.pan, 100)
    assert stale.code == "77", stale.fields
    assert stale.processing == codec.PROCESSING_SIGN_ON
    signed = await term.sign_on()
    assert batch_of(signed.fields) == codec.next_batch(old) == term.batch
    assert (await term.purchase(card.pan, 100)).code == "00"
    assert await kit.available(card.account_id) == 50_000 - 3_400


# --- 11. STAN and batch wrap ----------------------------------------------------------------


async def test_stan_wraps_from_999999_to_000001_within_a_batch(sqlite_kit: Kit) -> None:
    kit = sqlite_kit
    term = await kit.terminal()
    card = await kit.card(10_000)
    term.stan = "999998"
    last = await term.purchase(card.pan, 100)
    assert last.code == "00"
    assert last.fields["11"] == "999999"
    wrapped = await term.purchase(card.pan, 200)
    assert wrapped.code == "00", wrapped.fields
    assert wrapped.fields["11"] == "000001"
    assert wrapped.fields["37"] != last.fields["37"]
    assert wrapped.balance == 9_700
    void = await term.void(card.pan, 100, "999999")  # the original before the wrap
    assert void.code == "00", void.fields
    assert void.balance == 9_800
    settled = await term.settle()
    assert settled.fields["48"][30] == "1", settled.fields
    assert codec.parse_totals(settled.fields["48"]) == codec.Totals(200, 1, 0, 0)


async def test_batch_wraps_to_000001_and_a_reused_stan_is_a_new_transaction(
    sqlite_kit: Kit, sqlite_server: CardcoreServer
) -> None:
    kit, server = sqlite_kit, sqlite_server
    term = await kit.terminal()
    card = await kit.card(10_000)
    term.stan = "000000"
    old = await term.purchase(card.pan, 700)  # batch 000001, STAN 000001, first cycle
    assert old.code == "00"
    assert (term.batch, term.stan) == ("000001", "000001")
    assert (await term.settle()).fields["48"][30] == "1"

    # Drive the host's batch to 999999 (the server caches terminals: set it while stopped).
    await term.close()
    assert await asyncio.to_thread(server.stop) == 0
    assert term.tid.isalnum()
    update = f"UPDATE pos_terminals SET batch = '999999' WHERE tid = '{term.tid}'"  # noqa: S608
    await sql_execute(server.db_url, update)
    await asyncio.to_thread(server.start)
    for t in kit.terminals:
        t.port = server.gateway_port

    signed = await term.sign_on()
    assert batch_of(signed.fields) == "999999"
    settled = await term.settle()
    assert settled.code == "00", settled.fields
    assert settled.fields["48"][30] == "1"
    assert term.batch == "000001"
    signed = await term.sign_on()
    assert batch_of(signed.fields) == "000001"
    [row] = await sql_rows(
        server.db_url, "SELECT batch, batch_cycle FROM pos_terminals WHERE tid = :t", t=term.tid
    )
    assert (row["batch"], row["batch_cycle"]) == ("000001", 1)

    # Batch 000001, STAN 000001 again, same card and amount: a new sale, not a replay.
    term.stan = "000000"
    new = await term.purchase(card.pan, 700)
    assert new.code == "00", new.fields
    assert term.stan == "000001"
    assert new.fields["37"] != old.fields["37"]
    assert new.balance == 8_600
    assert await kit.available(card.account_id) == 8_600
    assert (await term.purchase(card.pan, 300)).code == "00"
    settled = await term.settle()
    assert codec.parse_totals(settled.fields["48"]) == codec.Totals(1_000, 2, 0, 0)
    assert settled.fields["48"][30] == "1"
    rows = await sql_rows(
        server.db_url,
        "SELECT batch_cycle, batch FROM pos_settlements WHERE tid = :t ORDER BY id",
        t=term.tid,
    )
    assert [(r["batch_cycle"], r["batch"]) for r in rows] == [
        (0, "000001"),
        (0, "999999"),
        (1, "000001"),
    ]


# --- 12. across midnight ---------------------------------------------------------------------


async def test_matching_across_midnight_never_depends_on_the_date(sqlite_kit: Kit) -> None:
    kit = sqlite_kit
    term = await kit.terminal()
    card = await kit.card(10_000)

    # A void after midnight of a sale before it (F61 carries the original's date too).
    sale = purchase_fields(term, card.pan, 1_200, **{"12": "235958", "13": "1231"})
    assert (await term.send(sale)).code == "00"
    original = term.batch + sale["11"] + "1231"
    void = message(
        term, "0200", "200000", "23", pan=card.pan, amount=1_200,
        **{"12": "000003", "13": "0101", "61": original},
    )  # fmt: skip
    reply = await term.send(void)
    assert reply.code == "00", reply.fields
    assert reply.balance == 10_000

    # A reversal after midnight of a sale before it whose reply was lost.
    lost = purchase_fields(term, card.pan, 800, **{"12": "235959", "13": "0228"})
    await term.send_and_drop(lost)
    await kit.wait_available(card.account_id, 9_200)
    reply = await term.send(reversal_of(lost, **{"12": "000010", "13": "0301"}))
    assert reply.code == "00", reply.fields
    assert await kit.available(card.account_id) == 10_000

    # A retransmission dated the next day is the same transaction.
    sale = purchase_fields(term, card.pan, 600, **{"12": "235959", "13": "0630"})
    first = await term.send(sale)
    assert first.code == "00"
    again = await term.send({**sale, "12": "000001", "13": "0701"})
    assert again.code == "00", again.fields
    assert again.fields["37"] == first.fields["37"]
    assert await kit.available(card.account_id) == 9_400


# --- 13. PIN ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "pin"), [(KeyMode.AES, "739146028351"), (KeyMode.TDES, "582039174625")], ids=str
)
async def test_pin_blocks(sqlite_kit: Kit, mode: KeyMode, pin: str) -> None:
    kit = sqlite_kit
    term = await kit.terminal(mode)
    kit.server.vault[f"pin {mode}"] = pin
    card = await kit.card(10_000)

    sale = await term.purchase(card.pan, 1_000, pin=pin)  # format 4 (AES) or 0 (3DES)
    assert sale.code == "00", sale.fields
    assert sale.balance == 9_000

    sizes = (16,) if mode is KeyMode.AES else (16, 8)
    for size in sizes:
        fields = purchase_fields(
            term, card.pan, 1_000, **{"22": "012", "26": "06", "52": random_pin_block(size)}
        )
        reply = await term.send(fields)
        assert reply.code == "99", (size, reply.fields)
    assert await kit.available(card.account_id) == 9_000


# --- 14 and 15. the journal verifies, the log keeps no secret -------------------------------


async def test_zz_after_the_run_the_ledger_verifies_and_the_log_holds_no_secret(
    kit: Kit, server: CardcoreServer
) -> None:
    """Last in the module: stops the server. Does some work of its own first, so that it
    means something when run alone."""
    for mode in MODES:
        term = await kit.terminal(mode)
        card = await kit.card(5_000)
        pin = "40917365" if mode is KeyMode.AES else "51827364"
        server.vault[f"pin {mode} last"] = pin
        assert (await term.purchase(card.pan, 1_000, pin=pin)).code == "00"
        await term.close()
    await kit.session.close()

    assert await asyncio.to_thread(server.stop) == 0
    done = await asyncio.to_thread(
        run_cardcore, "ledger", "verify", "--db", server.db_url, cwd=server.workdir
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert '"status": "ok"' in done.stdout, done.stdout

    log = server.stderr
    assert "terminal signed on" in log  # the log is the run's log
    lowered = log.lower()
    leaked = sorted(label for label, value in server.vault.items() if value.lower() in lowered)
    assert not leaked, f"secrets in the server log: {leaked}"
    assert sum(label.startswith("pan ") for label in server.vault) >= 2
    assert sum(label.startswith("tmk ") for label in server.vault) >= 2
    assert sum(label.startswith("pin ") for label in server.vault) >= 2
    errors = [line for line in log.splitlines() if '"level": "error"' in line]
    assert not errors, errors
