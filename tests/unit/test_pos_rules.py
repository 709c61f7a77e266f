"""The POS rules of issue 4, without a database: what each card state answers and which
response code carries it, member prices, the legs of a cross-entity transfer, the split
tender's arithmetic and replay, the top-up maximum within one call, PIN handling (and that
no PIN or PIN block reaches a log line), the lock order of concurrent calls, and the new
fields on the wire (F60.6, F54 amount due, F48 discount TLV, the host JSON)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from sqlalchemy.exc import OperationalError

from cardcore import limits
from cardcore.cards.model import (
    BASIS_POINTS,
    GIVE_BACK_STATES,
    OUTCOME_OF_STATE,
    BatchLine,
    Card,
    CardClass,
    CardState,
    Kind,
    Outcome,
    PosRequest,
    PosRequestError,
    PosResult,
    Terminal,
    batch_totals,
    member_price,
    outcome_of_state,
    parse_request,
    request_json,
    result_from_json,
    value_postings,
)
from cardcore.cards.pins import PinCheck
from cardcore.cards.pos import PosService, _answer, card_token
from cardcore.frontend_gateway import codec, security
from cardcore.frontend_gateway.processor import CODE_OF_OUTCOME, Processor
from cardcore.frontend_gateway.saf import ReversalQueue
from cardcore.frontend_gateway.security import KeyMode
from cardcore.frontend_gateway.terminal import RESPONSE_TEXT, PosTerminal, Reply
from cardcore.ledger.model import (
    Account,
    AccountFlags,
    AccountInfo,
    Balance,
    CreateTransfer,
    Op,
    Result,
)
from cardcore.metrics import Metrics
from tests.helpers import ClaimsInMemory

KEK = bytes(range(32))
TOKEN_KEY = b"k" * 32
PAN, OTHER_PAN = "6288880000000013", "6288880000000021"
PIN = "482913"


# --- states and codes -----------------------------------------------------------------------


def test_every_card_state_but_active_has_an_outcome_and_a_response_code() -> None:
    codes = {state: CODE_OF_OUTCOME[outcome_of_state(state)] for state in CardState}
    assert codes == {
        CardState.INACTIVE: "62",  # restricted until activated
        CardState.ACTIVE: "14",  # never asked: an active card is not declined for its state
        CardState.FROZEN: "62",  # restricted card
        CardState.LOST: "41",  # lost card, pick up
        CardState.CLOSED: "14",  # dead number
        CardState.REPLACED: "14",
    }
    assert set(OUTCOME_OF_STATE) == set(CardState) - {CardState.ACTIVE}
    assert outcome_of_state("no-such-state") is Outcome.CARD_CLOSED  # unknown: never usable
    assert sorted(GIVE_BACK_STATES) == sorted({CardState.ACTIVE, CardState.FROZEN, CardState.LOST})


def test_new_outcomes_have_their_iso_codes_and_the_terminal_names_them() -> None:
    assert {
        o: CODE_OF_OUTCOME[o]
        for o in (
            Outcome.PARTIAL_APPROVED,
            Outcome.CARD_LOST,
            Outcome.CARD_CLOSED,
            Outcome.CARD_NOT_ACTIVE,
            Outcome.PIN_REQUIRED,
            Outcome.PIN_WRONG,
            Outcome.PIN_LOCKED,
        )
    } == {
        Outcome.PARTIAL_APPROVED: "10",
        Outcome.CARD_LOST: "41",
        Outcome.CARD_CLOSED: "14",
        Outcome.CARD_NOT_ACTIVE: "62",
        Outcome.PIN_REQUIRED: "55",
        Outcome.PIN_WRONG: "55",
        Outcome.PIN_LOCKED: "75",
    }
    assert set(CODE_OF_OUTCOME.values()) <= set(RESPONSE_TEXT)


# --- money rules ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("amount", "bp", "price"),
    [(2_350, 500, 2_232), (1_999, 500, 1_899), (100, 0, 100), (1, 1, 0), (100, 10_000, 0)],
)
def test_member_price_rounds_in_the_members_favour(amount: int, bp: int, price: int) -> None:
    assert member_price(amount, bp) == price
    assert isinstance(member_price(amount, bp), int)
    assert 0 <= amount - price <= -(-amount * bp // BASIS_POINTS)


def test_value_postings_balance_each_entity_and_the_clearing_pair_holds_the_amount() -> None:
    entity = {1: "A", 2: "A", 3: "B", 4: "B"}  # card, due_to (A), due_from (B), sales (B)
    legs = value_postings(source=1, target=4, amount=700, clearing=(2, 3))
    sums: dict[str, list[int]] = {"A": [0, 0], "B": [0, 0]}
    for account, side, amount in legs:
        sums[entity[account]][0 if side == "debit" else 1] += amount
    assert sums == {"A": [700, 700], "B": [700, 700]}
    assert legs[0] == (1, "debit", 700)  # the card's leg first: batch totals read it
    assert {(a, s) for a, s, _ in legs} >= {(2, "credit"), (3, "debit")}
    assert value_postings(source=1, target=4, amount=5, clearing=None) == (
        (1, "debit", 5),
        (4, "credit", 5),
    )


def test_a_partial_answer_carries_the_amount_taken_and_the_remainder() -> None:
    ok = Result(ok=True, code="ok", transfer_id=1234567, balances={41: Balance(500, 500)})
    card = Card("t", "m", "LE", 41, "", "active", 0)
    partial = _answer(ok, card, 500, 800)
    assert (partial.outcome, partial.amount, partial.remainder, partial.balance) == (
        Outcome.PARTIAL_APPROVED,
        500,
        300,
        0,
    )
    full = _answer(ok, card, 800, 800)
    assert (full.outcome, full.remainder) == (Outcome.APPROVED, None)


# --- the wire -----------------------------------------------------------------------------------


def test_host_json_settlement_figures_are_bounded_as_f48_bounds_them() -> None:
    """Over the HTTP host a total or an upload line above 2^63 reached the database's bigint
    columns (a database error, not a clean refusal): the figures are bounded as F48's."""
    settle = request_json(PosRequest(Kind.SETTLE, "T0000001", "000001", "000002"))
    most = [limits.POS_AMOUNT_MAX, limits.POS_TOTALS_COUNT_MAX] * 2
    assert parse_request({**settle, "totals": most}, "r").totals == tuple(most)
    for i in range(4):
        over = [*most[:i], most[i] + 1, *most[i + 1 :]]
        with pytest.raises(PosRequestError, match=r"r\.totals"):
            parse_request({**settle, "totals": over}, "r")
    with pytest.raises(PosRequestError, match=r"r\.lines"):
        parse_request({**settle, "lines": [["000001", 2**63]]}, "r")
    line = ["000001", limits.POS_AMOUNT_MAX]
    assert parse_request({**settle, "lines": [line]}, "r").lines == (tuple(line),)


def test_host_json_carries_the_partial_flag_the_discount_and_the_remainder() -> None:
    r = PosRequest(Kind.PURCHASE, "T0000001", "000001", "000002", PAN, 900, partial=True)
    assert request_json(r)["partial"] is True
    assert parse_request(request_json(r), "r") == r
    assert "partial" not in request_json(PosRequest(Kind.PURCHASE, "T0000001"))
    result = PosResult(Outcome.PARTIAL_APPROVED, 0, 500, remainder=400, discount_bp=500)
    assert result_from_json(result.json()) == result


def test_f54_entries_and_the_discount_tlv() -> None:
    both = codec.format_balance(0) + codec.format_amount(codec.AMOUNT_TYPE_DUE, 11_200)
    assert both == "0002156C000000000000" + "0004156C000000011200"
    assert codec.parse_amounts(both) == {"02": 0, "04": 11_200}
    with pytest.raises(codec.FormatError):
        codec.parse_amounts(both[:-1])
    with pytest.raises(codec.FormatError):
        codec.parse_amounts(both * 4)  # eight entries: six at most
    assert codec.tlv_encode([(codec.TLV_DISCOUNT_BP, "500")]) == "DB003500"


@dataclass
class FixedHost:
    answer: PosResult
    seen: list[PosRequest] = field(default_factory=list)

    async def pos(self, requests: Sequence[PosRequest]) -> list[PosResult]:
        out = []
        for r in requests:
            if r.kind is Kind.SIGN_ON:
                sealed = security.seal(KEK, bytes(16), b"tmk:T0000001").hex()
                out.append(PosResult(Outcome.APPROVED, batch="000001", mid="M00000000000001",
                                     key_mode="aes", tmk_sealed=sealed))  # fmt: skip
            else:
                self.seen.append(r)
                out.append(self.answer)
        return out

    async def close(self) -> None:
        return None


class Loopback(PosTerminal):
    """The reference terminal talking to a processor in memory."""

    gateway: Processor
    _out: bytes | None = None

    async def send_raw(self, frame: bytes) -> None:
        parts = codec.split_frame(frame[codec.LENGTH_BYTES :])
        reply = await self.gateway.handle(parts.body)
        assert reply is not None
        self._out = codec.pack_frame(
            codec.reply_tpdu(parts.tpdu), codec.reply_header(parts.header, processing=0),
            reply.body,
        )  # fmt: skip

    async def read_reply(self) -> Reply:
        assert self._out is not None
        parts = codec.split_frame(self._out[codec.LENGTH_BYTES :])
        return Reply(codec.decode(parts.body), 0, self._out)


async def _terminal(host: FixedHost, tmp_path: Any) -> Loopback:
    saf = ReversalQueue(tmp_path / "saf.jsonl")
    saf.open()
    term = Loopback("gateway", 0, "T0000001", "M00000000000001", bytes(16), KeyMode.AES)
    term.gateway = Processor(host, saf, KEK, Metrics())
    assert (await term.sign_on()).code == "00"
    return term


async def test_a_partial_approval_on_the_wire(tmp_path: Any) -> None:
    answer = PosResult(Outcome.PARTIAL_APPROVED, 0, 700, "000000000042", "000042", remainder=300)
    host = FixedHost(answer)
    term = await _terminal(host, tmp_path)
    reply = await term.purchase(PAN, 1_000, partial=True)
    assert (reply.code, reply.approved_amount, reply.balance, reply.remainder) == (
        "10",
        700,
        0,
        300,
    )
    assert [(x.kind, x.amount) for x in term.lines] == [("purchase", 700)]  # counts the taken
    # Without F60.6 the host is told the terminal takes no partial approval.
    await term.purchase(PAN, 1_000)
    assert [r.partial for r in host.seen] == [True, False]
    await term.gateway.saf.close()


async def test_an_inquiry_reply_carries_the_class_discount(tmp_path: Any) -> None:
    host = FixedHost(PosResult(Outcome.APPROVED, balance=9_000, discount_bp=850))
    term = await _terminal(host, tmp_path)
    reply = await term.inquiry(PAN)
    assert (reply.code, reply.balance, reply.discount_bp, reply.fields["48"]) == (
        "00",
        9_000,
        850,
        "DB003850",
    )
    host.answer = PosResult(Outcome.APPROVED, balance=9_000)
    assert (await term.inquiry(PAN)).discount_bp is None
    await term.gateway.saf.close()


def test_the_zone_pin_reader_is_the_gateways_zone_key() -> None:
    zpk = security.zone_pin_key(KEK)
    assert zpk == security.derive_key(KEK, b"cardcore/zone-pin-key/v1")[:16]
    block = security.pin_block_4(PIN, PAN, zpk).hex().upper()
    assert security.zone_pin_reader(KEK)(PAN, block) == PIN
    with pytest.raises(ValueError, match="zone PIN key") as caught:
        security.zone_pin_reader(KEK)(OTHER_PAN + "0", "00" * 16)
    assert PIN not in str(caught.value) and block not in str(caught.value)


# --- the service with fakes -----------------------------------------------------------------------

T_A = Terminal("TERM000A", "M00000000000001", "S-A", "LE-A", "aes", "00", "active", "000001", 0,
               901, 902)  # fmt: skip


@dataclass
class Cards(ClaimsInMemory):
    """A directory of a few cards and one terminal; no transfer is stored."""

    cards: dict[str, Card]
    classes: dict[str, CardClass] = field(default_factory=dict)

    async def terminal(self, tid: str) -> Terminal | None:
        return T_A if tid == T_A.tid else None

    async def card(self, token: str) -> Card | None:
        return self.cards.get(token)

    async def warm_cards(self, tokens: list[str]) -> None:
        return None  # held already

    async def card_class(self, code: str) -> CardClass | None:
        return self.classes.get(code)

    async def transfer_by_key(self, key: str) -> dict[str, Any] | None:
        return None

    async def undone(self, transfer_id: int) -> bool:
        return False


@dataclass
class Books:
    """A ledger in memory: balances per account, transfers applied in order, no floors."""

    balances: dict[int, int]
    calls: list[list[Op]] = field(default_factory=list)
    delay_s: float = 0.0
    busy: set[int] = field(default_factory=set)  # card accounts in a call being applied

    async def account(self, account_id: int) -> Account | None:
        if account_id not in self.balances:
            return None
        info = AccountInfo(account_id, "CNY", "LE-A", "card", "x", "stored_value", AccountFlags())
        return Account(info, Balance(0, self.balances[account_id]))

    async def submit(self, ops: Sequence[Op]) -> list[Result]:
        self.calls.append(list(ops))
        cards = {p.account_id for op in ops if isinstance(op, CreateTransfer) for p in op.postings}
        cards &= set(self.balances)
        assert not cards & self.busy, "two calls on one card account at once"
        self.busy |= cards
        await asyncio.sleep(self.delay_s)
        self.busy -= cards
        out = []
        for i, op in enumerate(ops):
            assert isinstance(op, CreateTransfer)
            for p in op.postings:
                if p.account_id in self.balances:
                    sign = -1 if p.side == "debit" else 1
                    self.balances[p.account_id] += sign * p.amount
            out.append(Result(ok=True, code="ok", transfer_id=100 + len(self.calls) * 10 + i))
        return out


def _card(pan: str, account: int, **extra: Any) -> Card:
    return Card(card_token(TOKEN_KEY, pan), "masked", "LE-A", account, "", "active", 0, **extra)


def _service(books: Books, cards: list[Card], **extra: Any) -> PosService:
    directory = Cards({c.token: c for c in cards}, extra.pop("classes", {}))
    return PosService(books, directory, TOKEN_KEY, **extra)  # type: ignore[arg-type]


def _purchase(pan: str, stan: str, amount: int, **extra: Any) -> PosRequest:
    return PosRequest(Kind.PURCHASE, T_A.tid, "000001", stan, pan, amount, **extra)


async def test_purchases_in_one_call_each_see_what_the_ones_before_took() -> None:
    books = Books({41: 1_000})
    service = _service(books, [_card(PAN, 41)])
    answers = await service.handle(
        [_purchase(PAN, f"{i:06d}", 300, partial=True) for i in range(1, 6)]
    )
    assert [(a.outcome, a.amount) for a in answers] == [
        (Outcome.APPROVED, 300),
        (Outcome.APPROVED, 300),
        (Outcome.APPROVED, 300),
        (Outcome.PARTIAL_APPROVED, 100),
        (Outcome.APPROVED, 300),  # the planned balance is 0: sent in full, the ledger decides
    ]
    assert answers[3].remainder == 200
    split = books.calls[0][3]
    assert isinstance(split, CreateTransfer)
    meta = dict(split.metadata)
    assert meta["requested"] == "300"


async def test_a_card_closed_while_its_purchase_waited_for_the_lock_is_declined() -> None:
    """The state is read again under the card's lock: a purchase planned while its card
    was active, whose card was closed before the lock came (a member's delete closes its
    cards under the same locks), is declined and nothing is submitted."""
    books = Books({41: 10_000})
    service = _service(books, [_card(PAN, 41)])
    directory = service.directory
    assert isinstance(directory, Cards)
    planned = directory.card

    async def closed_after_the_plan(asked: str) -> Card | None:
        card = await planned(asked)
        directory.card = closing  # type: ignore[method-assign,assignment]
        return card

    async def closing(asked: str) -> Card | None:
        found = await planned(asked)
        return None if found is None else replace(found, state="closed")

    directory.card = closed_after_the_plan  # type: ignore[method-assign,assignment]
    [answer] = await service.handle([_purchase(PAN, "000001", 300)])
    assert answer.outcome is Outcome.CARD_CLOSED
    assert books.calls == []


async def test_a_card_that_cannot_be_read_again_under_the_lock_fails_its_request_alone() -> None:
    books = Books({41: 10_000, 42: 10_000})
    service = _service(books, [_card(PAN, 41), _card(OTHER_PAN, 42)])
    directory = service.directory
    assert isinstance(directory, Cards)
    planned, reads = directory.card, {PAN: 0}

    async def second_read_fails(asked: str) -> Card | None:
        if asked == card_token(TOKEN_KEY, PAN):
            reads[PAN] += 1
            if reads[PAN] == 2:
                raise OperationalError("select", {}, Exception("statement timeout"))
        return await planned(asked)

    directory.card = second_read_fails  # type: ignore[method-assign,assignment]
    one, other = await service.handle(
        [_purchase(PAN, "000001", 300), _purchase(OTHER_PAN, "000002", 300)]
    )
    assert (one.outcome, other.outcome) == (Outcome.UNAVAILABLE, Outcome.APPROVED)
    assert len(books.calls) == 1 and len(books.calls[0]) == 1


async def test_two_calls_locking_the_same_cards_in_other_orders_never_deadlock() -> None:
    books = Books({41: 10_000, 42: 10_000}, delay_s=0.01)
    service = _service(books, [_card(PAN, 41), _card(OTHER_PAN, 42)])

    def pair(i: int) -> list[PosRequest]:
        first, second = (PAN, OTHER_PAN) if i % 2 else (OTHER_PAN, PAN)
        return [_purchase(first, f"{2 * i:06d}", 10), _purchase(second, f"{2 * i + 1:06d}", 10)]

    calls = [service.handle(pair(i)) for i in range(20)]
    answers = await asyncio.wait_for(asyncio.gather(*calls), timeout=10)
    assert all(a.outcome is Outcome.APPROVED for pair in answers for a in pair)
    assert books.balances == {41: 9_800, 42: 9_800}
    # The card locks are held across the ledger call: never two calls on one card at once
    # (`Books.submit` checks), yet every call went through.
    assert len(books.calls) == 20


async def test_two_top_ups_of_one_card_in_one_call_and_the_class_maximum() -> None:
    books = Books({41: 900})
    vip = CardClass("VIP", "VIP", True, False, (), 500, 100, 0, 0, 1_000, 0, "active")
    service = _service(books, [_card(PAN, 41, class_code="VIP")], classes={"VIP": vip})
    topup = [PosRequest(Kind.TOPUP, T_A.tid, "000001", f"{i:06d}", PAN, 60) for i in (1, 2)]
    first, second = await service.handle(topup)
    assert (first.outcome, second.outcome) == (Outcome.APPROVED, Outcome.OVER_LIMIT)
    assert len(books.calls[0]) == 1
    held = books.calls[0][0]
    assert isinstance(held, CreateTransfer)
    meta = dict(held.metadata)
    assert meta["card_class"] == "VIP" and "discount_bp" not in meta


@dataclass
class CountingPins:
    verdicts: list[PinCheck]
    seen: list[tuple[int, str]] = field(default_factory=list)

    async def check(self, card_id: int, pin: str) -> tuple[PinCheck, int]:
        self.seen.append((card_id, pin))
        return self.verdicts.pop(0), 0


async def test_pin_rules_and_no_pin_in_any_log_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    books = Books({41: 5_000})
    card = _card(PAN, 41, id=7, has_pin=True)
    zpk = security.zone_pin_key(KEK)
    block = security.pin_block_4(PIN, PAN, zpk).hex().upper()
    pins = CountingPins([PinCheck.WRONG, PinCheck.LOCKED, PinCheck.OK, PinCheck.OK])
    service = _service(books, [card], pin_of=security.zone_pin_reader(KEK), pins=pins)
    answers = await service.handle(
        [
            _purchase(PAN, "000001", 100),
            _purchase(PAN, "000002", 100, pin_block=block),
            _purchase(PAN, "000003", 100, pin_block=block),
            _purchase(PAN, "000004", 100, pin_block=block),
            _purchase(PAN, "000005", 100, pin_block="AB" * 16),  # not a zone block of ours
            PosRequest(Kind.INQUIRY, T_A.tid, "000001", "000006", PAN),  # no PIN: answered
            PosRequest(Kind.INQUIRY, T_A.tid, "000001", "000007", PAN, pin_block=block),
        ]
    )
    assert [a.outcome for a in answers] == [
        Outcome.PIN_REQUIRED,
        Outcome.PIN_WRONG,
        Outcome.PIN_LOCKED,
        Outcome.APPROVED,
        Outcome.BAD_REQUEST,
        Outcome.APPROVED,
        Outcome.APPROVED,
    ]
    assert pins.seen == [(7, PIN)] * 4
    # A host that cannot read PINs never approves a card that has one.
    blind = _service(Books({41: 5_000}), [card])
    [refused] = await blind.handle([_purchase(PAN, "000001", 100, pin_block=block)])
    assert refused.outcome is Outcome.UNAVAILABLE
    text = caplog.text + "".join(repr(r.__dict__) for r in caplog.records)
    assert PIN not in text and block not in text and PAN not in text


@dataclass
class SlowCoupons:
    """A coupon handler whose answers take `wait_s` each (a round trip under load): how
    many were in flight at once, and a database error for one STAN."""

    wait_s: float
    failing: str = ""
    inflight: int = 0
    most: int = 0

    async def handle(self, r: PosRequest, _t: Terminal, _key: str, _card: Card | None) -> PosResult:
        self.inflight += 1
        self.most = max(self.most, self.inflight)
        try:
            await asyncio.sleep(self.wait_s)
            if r.stan == self.failing:
                raise TimeoutError("statement timeout")
            return PosResult(Outcome.APPROVED, campaign=f"C{r.stan}")
        finally:
            self.inflight -= 1


def _coupon_query(stan: str) -> PosRequest:
    return PosRequest(Kind.COUPON_QUERY, T_A.tid, "000001", stan, "", 500, coupon="ABCD")


async def test_a_calls_coupon_requests_are_planned_at_once_and_answered_in_order() -> None:
    books = Books({41: 10_000})
    service = _service(books, [_card(PAN, 41)])
    coupons = SlowCoupons(wait_s=0.2, failing="000004")
    service.features[Kind.COUPON_QUERY] = coupons.handle
    requests = [_coupon_query("000001"), _purchase(PAN, "000002", 100)]
    requests += [_coupon_query(f"{i:06d}") for i in range(3, 6)]
    answers = await service.handle(requests)
    assert coupons.most == 4  # one after another (before): 1
    assert [(a.outcome, a.campaign) for a in answers] == [
        (Outcome.APPROVED, "C000001"),
        (Outcome.APPROVED, ""),  # the purchase, planned meanwhile
        (Outcome.APPROVED, "C000003"),
        (Outcome.UNAVAILABLE, ""),  # its database error is its own
        (Outcome.APPROVED, "C000005"),
    ]
    assert books.balances == {41: 9_900}


async def test_at_most_a_bound_of_a_calls_feature_requests_at_once() -> None:
    service = _service(Books({}), [])
    coupons = SlowCoupons(wait_s=0.01)
    service.features[Kind.COUPON_QUERY] = coupons.handle
    count = limits.POS_FEATURE_PLANS_CONCURRENT_MAX + 5
    answers = await service.handle([_coupon_query(f"{i:06d}") for i in range(1, count + 1)])
    assert coupons.most == limits.POS_FEATURE_PLANS_CONCURRENT_MAX
    assert [a.campaign for a in answers] == [f"C{i:06d}" for i in range(1, count + 1)]


async def test_a_calls_money_is_submitted_while_its_coupons_are_answered() -> None:
    books = Books({41: 10_000})
    service = _service(books, [_card(PAN, 41)])
    seen: list[int] = []

    async def coupon(r: PosRequest, _t: Terminal, _key: str, _card: Card | None) -> PosResult:
        # A slow coupon: it answers once the purchase of its call reached the ledger (or
        # gives up after a second: then the money waited behind it, as before).
        for _ in range(100):
            if books.calls:
                break
            await asyncio.sleep(0.01)
        seen.append(len(books.calls))
        return PosResult(Outcome.APPROVED, campaign="C")

    service.features[Kind.COUPON_QUERY] = coupon
    answers = await service.handle([_coupon_query("000001"), _purchase(PAN, "000002", 100)])
    assert seen == [1]  # the money did not wait for the coupon (before: 0)
    assert [a.outcome for a in answers] == [Outcome.APPROVED, Outcome.APPROVED]
    assert answers[0].campaign == "C" and books.balances == {41: 9_900}


async def test_a_calls_money_does_not_wait_for_its_feature_requests_claims() -> None:
    """A feature request claims its key in a write of its own (`PosService._claim`); the
    call's money goes on meanwhile, and the feature is planned once its claim is written."""
    books = Books({41: 10_000})
    service = _service(books, [_card(PAN, 41)])
    directory = service.directory
    assert isinstance(directory, Cards)
    written = directory.claim_keys
    submitted_before_claim: list[int] = []

    async def slow_claim(wanted: dict[str, str], now_ms: int) -> dict[str, str]:
        for _ in range(100):  # until the purchase reached the ledger (at most a second)
            if books.calls:
                break
            await asyncio.sleep(0.01)
        submitted_before_claim.append(len(books.calls))
        return await written(wanted, now_ms)

    async def coupon(r: PosRequest, _t: Terminal, _key: str, _card: Card | None) -> PosResult:
        return PosResult(Outcome.APPROVED, campaign="C")

    directory.claim_keys = slow_claim  # type: ignore[method-assign]
    service.features[Kind.COUPON_REDEEM] = coupon
    redeem = replace(_coupon_query("000001"), kind=Kind.COUPON_REDEEM)
    answers = await service.handle([redeem, _purchase(PAN, "000002", 100)])
    assert submitted_before_claim == [1]  # the money did not wait for the claim (before: 0)
    assert [a.outcome for a in answers] == [Outcome.APPROVED, Outcome.APPROVED]
    assert list(directory.claims.values()) == ["coupon"]


async def test_a_defect_in_the_claims_answers_the_feature_requests_only() -> None:
    books = Books({41: 10_000})
    service = _service(books, [_card(PAN, 41)])
    directory = service.directory
    assert isinstance(directory, Cards)

    async def defect(wanted: dict[str, str], now_ms: int) -> dict[str, str]:
        raise RuntimeError("a defect in the claims")

    directory.claim_keys = defect  # type: ignore[method-assign]
    redeem = replace(_coupon_query("000001"), kind=Kind.COUPON_REDEEM)
    answers = await service.handle([redeem, _purchase(PAN, "000002", 100)])
    assert [a.outcome for a in answers] == [Outcome.UNAVAILABLE, Outcome.APPROVED]
    assert books.balances == {41: 9_900}


async def test_a_failure_of_the_money_ends_the_calls_features_and_is_raised_as_itself() -> None:
    books = Books({41: 10_000})
    service = _service(books, [_card(PAN, 41)])
    ended: list[str] = []

    async def coupon(r: PosRequest, _t: Terminal, _key: str, _card: Card | None) -> PosResult:
        try:
            await asyncio.sleep(10)
            return PosResult(Outcome.APPROVED)
        except asyncio.CancelledError:
            ended.append(r.stan)
            raise

    async def broken(_ops: Sequence[Op]) -> list[Result]:
        await asyncio.sleep(0.05)  # the coupon is under way
        raise RuntimeError("a defect in the ledger call")

    service.features[Kind.COUPON_QUERY] = coupon
    books.submit = broken  # type: ignore[method-assign,assignment]
    with pytest.raises(RuntimeError, match="a defect"):  # not an ExceptionGroup
        await service.handle([_coupon_query("000001"), _purchase(PAN, "000002", 100)])
    assert ended == ["000001"]  # ended before handle raised

    # A call cancelled (the host closing) ends its features before it ends.
    ended.clear()
    books.submit = Books.submit.__get__(books)  # type: ignore[method-assign]
    books.delay_s = 10
    call = asyncio.ensure_future(
        service.handle([_coupon_query("000003"), _purchase(PAN, "000004", 100)])
    )
    await asyncio.sleep(0.05)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert ended == ["000003"]


async def test_a_feature_that_fails_answers_its_own_request_only() -> None:
    books = Books({41: 10_000})
    service = _service(books, [_card(PAN, 41)])

    async def defect(r: PosRequest, _t: Terminal, _key: str, _card: Card | None) -> PosResult:
        await asyncio.sleep(0.01)
        raise ValueError("a defect in a coupon rule")

    service.features[Kind.COUPON_QUERY] = defect
    answers = await service.handle([_coupon_query("000001"), _purchase(PAN, "000002", 100)])
    assert [a.outcome for a in answers] == [Outcome.UNAVAILABLE, Outcome.APPROVED]
    assert books.balances == {41: 9_900}


def test_batch_totals_count_a_purchase_only_while_its_chain_of_reversals_is_even() -> None:
    """A purchase voided (1 reversal), its void reversed (2: it stands), voided again (3)
    and that void reversed (4): counted in the batch only at 0, 2 and 4 reversals."""

    def line(id_: int, reason: str, target: int | None = None) -> BatchLine:
        kind = "posted" if target is None else "reverse"
        return BatchLine(id_, f"K{id_}", kind, reason, 500, target)

    lines = [line(1, "purchase"), line(2, "purchase")]
    chain = [line(3, "void", 1), line(4, "reversal", 3), line(5, "void", 4), line(6, "reversal", 5)]
    expected = [(1_000, 2), (500, 1), (1_000, 2), (500, 1), (1_000, 2)]
    for n, (amount, count) in enumerate(expected):
        assert batch_totals([*lines, *chain[:n]]) == (amount, count, 0, 0), n
