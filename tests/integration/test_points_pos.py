"""Points at the POS, on SQLite and PostgreSQL, through the whole host app: a purchase of a
card whose class has a program earns (rules in scope of the store, caps), a resend earns
nothing twice, a void and a terminal reversal take the earning back, a refund claws back its
share, a purchase paid another way earns with POINTS_EARN, and settlement totals count none
of it.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy.exc import OperationalError

from cardcore import limits
from cardcore.cards.http import POS_KEY
from cardcore.cards.model import Kind, Outcome, PosRequest, PosResult, batch_totals
from cardcore.cards.pos import PosService
from cardcore.ledger.http import LEDGER_KEY
from cardcore.ledger.writer import Busy
from cardcore.points.http import POINTS_KEY
from cardcore.records import Unit
from tests import logscan
from tests.helpers import AdminClient, sql_rows
from tests.integration.test_manager_cards import block
from tests.integration.test_points_api import PROGRAM, RULE

_stans = itertools.count(1)
_tids = itertools.count(1)
_mobiles = itertools.count(1)


def fixed(ms: int) -> Callable[[], int]:
    """A clock standing at `ms`."""
    return lambda: ms


class Shop:
    """LE1 (S1, S2): program CLUB (1 point per CNY), class PTS earning in it and class
    PLAIN without a program; terminals in S1 and S2."""

    def __init__(self, admin: AdminClient) -> None:
        self.admin = admin
        self.pos: PosService = admin.app[POS_KEY]
        self.tids: dict[str, str] = {}

    async def make(self, **program: Any) -> Shop:
        admin = self.admin
        await admin.org("LE1", "S1", "S2")
        await admin.ok("POST", "/v1/points/programs", json={**PROGRAM, **program})
        await admin.ok("POST", "/v1/points/programs/CLUB/rules", json=RULE)
        await admin.ok("POST", "/v1/card-classes", json={"code": "PTS", "name": "Points",
                       "named": True, "points_program": "CLUB"})  # fmt: skip
        await admin.ok("POST", "/v1/card-classes", json={"code": "PLAIN", "name": "Plain",
                       "named": True})  # fmt: skip
        for store in ("S1", "S2"):
            await admin.ok("POST", "/v1/grants", json={"store": store, "function": "stored_value"})
            n = next(_tids)
            tid = f"P{n:07d}"
            answer = await admin.ok("POST", "/v1/terminals", json={"tid": tid,
                                    "mid": f"M{n:014d}", "store": store})  # fmt: skip
            from tests import logscan  # noqa: PLC0415

            logscan.SCAN.remember("a terminal master key", answer["tmk"])
            self.tids[store] = tid
        return self

    async def card(self, class_code: str = "PTS", balance: int = 100_000) -> dict[str, Any]:
        mobile = f"137{next(_mobiles):08d}"
        member = await self.admin.ok("POST", "/v1/members", json={
            "mobile": mobile, "name": "Han Mei", "home_store": "S1"})  # fmt: skip
        card: dict[str, Any] = await self.admin.ok("POST", "/v1/cards", json={
            "class_code": class_code, "store": "S1", "member_id": member["id"]})  # fmt: skip
        await self.admin.ok("POST", f"/v1/cards/{card['id']}/topups", json={
            "amount": balance, "tender": "cash", "receipt": "R1",
            "key": f"top{card['id']}"})  # fmt: skip
        return card

    def request(self, kind: Kind, card: dict[str, Any] | None, store: str = "S1",
                **fields: Any) -> PosRequest:  # fmt: skip
        return PosRequest(kind=kind, terminal=self.tids[store], batch="000001",
                          stan=fields.pop("stan", f"{next(_stans):06d}"),
                          card="" if card is None else card["pan"], **fields)  # fmt: skip

    async def one(self, request: PosRequest) -> PosResult:
        [answer] = await self.pos.handle([request])
        return answer

    async def points(self, card: dict[str, Any]) -> dict[str, Any]:
        body: dict[str, Any] = await self.admin.ok("GET", f"/v1/cards/{card['id']}/points")
        return body

    async def money(self, card: dict[str, Any]) -> int:
        body = await self.admin.ok("GET", f"/v1/cards/{card['id']}")
        return int(body["balances"]["available"])


async def test_a_purchase_earns_by_the_rules_and_shows_in_the_cards_points(
    admin: AdminClient, db_url: str
) -> None:
    shop = await Shop(admin).make()
    card = await shop.card()
    sale = await shop.one(shop.request(Kind.PURCHASE, card, amount=2_550))
    assert sale.outcome is Outcome.APPROVED
    assert (sale.points, sale.points_balance, sale.balance) == (25, 25, 100_000 - 2_550)
    view = await shop.points(card)
    assert (view["program"], view["balance"], view["usable"], view["pending"], view["debt"]) == (
        "CLUB",
        25,
        25,
        0,
        0,
    )
    [lot] = view["lots"]
    assert lot["remaining"] == 25
    assert lot["expires_on"] is not None and lot["expires_on"].endswith(("-28", "-29", "-30",
                                                                         "-31"))  # fmt: skip
    [earning] = await sql_rows(db_url, "SELECT * FROM points_earnings")
    assert (earning["points"], earning["amount"], earning["store"]) == (25, 2_550, "S1")
    [part] = await sql_rows(db_url, "SELECT * FROM points_earning_parts")
    assert (part["rule"], part["points"]) == ("BASE", 25)
    # The ledger holds it: the lot account is the holder's, the other side points_issued.
    rows = await sql_rows(db_url, "SELECT owner_kind, owner_id, purpose, credits_posted, "
                          "debits_posted, no_overdraft FROM ledger_accounts WHERE asset = "
                          "'PTS:CLUB' ORDER BY id")  # fmt: skip
    assert [(r["owner_kind"], r["purpose"]) for r in rows] == [
        ("entity", "points_issued"),
        ("points", lot["lot"]),
    ]
    assert rows[1]["owner_id"] == str(card["account_id"])
    assert bool(rows[1]["no_overdraft"])
    assert (rows[0]["debits_posted"], rows[1]["credits_posted"]) == (25, 25)


async def test_a_resend_earns_nothing_twice(admin: AdminClient, db_url: str) -> None:
    shop = await Shop(admin).make()
    card = await shop.card()
    sale = shop.request(Kind.PURCHASE, card, amount=10_000)
    first = await shop.one(sale)
    again = await shop.one(sale)
    assert (first.points, again.points) == (100, 100)
    assert again.replayed
    both = await shop.pos.handle([sale, sale])
    assert [a.points for a in both] == [100, 100]
    assert (await shop.points(card))["balance"] == 100
    assert len(await sql_rows(db_url, "SELECT * FROM points_earnings")) == 1


async def test_a_purchase_under_the_key_of_a_points_earning_is_answered_94(
    admin: AdminClient, db_url: str
) -> None:
    """A POINTS_EARN claims its key (terminal, batch, STAN): a purchase sent under it is
    another function, answered 94 with no money moved and nothing earned twice."""
    shop = await Shop(admin).make()
    card = await shop.card()
    stan = "004242"
    earn = await shop.one(shop.request(Kind.POINTS_EARN, card, amount=8_800, stan=stan))
    assert earn.points == 88
    sale = await shop.one(shop.request(Kind.PURCHASE, card, amount=10_000, stan=stan))
    assert sale.outcome is Outcome.DUPLICATE_MISMATCH
    assert (await shop.points(card))["balance"] == 88
    assert len(await sql_rows(db_url, "SELECT * FROM points_earnings")) == 1
    assert await sql_rows(db_url, "SELECT * FROM ledger_transfers WHERE reason = 'purchase'") == []


async def test_a_points_redemption_under_a_purchases_key_never_takes_the_key_from_it(
    admin: AdminClient, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A points redemption sent under the key of an approved purchase is answered 94 and
    claims nothing: the purchase's resend is still its own (replayed, approved). Its own
    resend finds its claim. And when the claims of a call cannot be written, only its
    feature requests are answered `unavailable`: the purchases of the call go on."""
    shop = await Shop(admin).make()
    card = await shop.card()
    await shop.one(shop.request(Kind.PURCHASE, card, amount=50_000))  # 500 points to spend
    sale = shop.request(Kind.PURCHASE, card, amount=1_000)
    assert (await shop.one(sale)).outcome is Outcome.APPROVED
    reused = await shop.one(shop.request(Kind.POINTS_REDEEM, card, points=100, stan=sale.stan))
    assert reused.outcome is Outcome.DUPLICATE_MISMATCH
    assert await sql_rows(db_url, "SELECT * FROM pos_claims") == []
    again = await shop.one(sale)
    assert (again.outcome, again.replayed) == (Outcome.APPROVED, True)
    redeem = shop.request(Kind.POINTS_REDEEM, card, points=100)
    assert (await shop.one(redeem)).outcome is Outcome.APPROVED
    resent = await shop.one(redeem)
    assert (resent.outcome, resent.replayed) == (Outcome.APPROVED, True)

    async def broken(*_args: Any) -> dict[str, str]:
        raise OperationalError("insert", {}, Exception("disk full"))

    monkeypatch.setattr(shop.pos.directory, "claim_keys", broken)
    earn = shop.request(Kind.POINTS_EARN, card, amount=1_000)
    paid = shop.request(Kind.PURCHASE, card, amount=1_000, store="S2")
    first, second = await shop.pos.handle([earn, paid])
    assert (first.outcome, second.outcome) == (Outcome.UNAVAILABLE, Outcome.APPROVED)


async def test_a_card_without_a_program_earns_nothing(admin: AdminClient, db_url: str) -> None:
    shop = await Shop(admin).make()
    card = await shop.card("PLAIN")
    sale = await shop.one(shop.request(Kind.PURCHASE, card, amount=10_000))
    assert sale.outcome is Outcome.APPROVED
    assert (sale.points, sale.points_balance) == (None, None)
    assert await sql_rows(db_url, "SELECT * FROM points_earnings") == []
    view = await shop.points(card)
    assert (view["program"], view["balance"], view["lots"]) == (None, 0, [])


async def test_a_closed_program_earns_nothing(admin: AdminClient, db_url: str) -> None:
    shop = await Shop(admin).make()
    card = await shop.card()
    await admin.ok("PATCH", "/v1/points/programs/CLUB", json={"state": "closed"})
    sale = await shop.one(shop.request(Kind.PURCHASE, card, amount=10_000))
    assert (sale.outcome, sale.points) == (Outcome.APPROVED, None)
    assert await sql_rows(db_url, "SELECT * FROM points_earnings") == []


async def test_rules_apply_in_their_stores_with_caps_and_the_class_multiplier(
    admin: AdminClient, db_url: str
) -> None:
    shop = await Shop(admin).make()
    path = "/v1/points/programs/CLUB/rules"
    await admin.ok("POST", path, json={"code": "S2BONUS", "kind": "bonus", "points": 50,
                                       "store": "S2"})  # fmt: skip
    grant = await admin.ok("POST", "/v1/grants", json={"store": "S2", "function": "points"})
    await admin.ok("POST", path, json={"code": "FOOD", "kind": "category", "points": 2,
                                       "per_fen": 100, "departments": ["FOOD"],
                                       "cap_per_day_points": 30})  # fmt: skip
    await admin.ok("PATCH", "/v1/card-classes/PTS", json={"points_multiplier_pct": 200})
    card = await shop.card()
    # S1: BASE 10 CNY -> 10 x 2 = 20; FOOD 10 CNY of food -> 20 x 2 = 40, capped at 30 a day.
    first = await shop.one(shop.request(Kind.PURCHASE, card, amount=1_000,
                                        basket=(("FOOD", 1_000),)))  # fmt: skip
    assert first.points == 20 + 30
    second = await shop.one(shop.request(Kind.PURCHASE, card, amount=1_000,
                                         basket=(("FOOD", 1_000),)))  # fmt: skip
    assert second.points == 20  # the day's food cap is used up
    # S2: its own bonus applies there: BASE 20 + bonus 50 x 2 = 100.
    there = await shop.one(shop.request(Kind.PURCHASE, card, "S2", amount=1_000))
    assert there.points == 20 + 100
    parts = await sql_rows(db_url, "SELECT rule, sum(points) AS n FROM points_earning_parts "
                           "GROUP BY rule ORDER BY rule")  # fmt: skip
    assert [(p["rule"], int(p["n"])) for p in parts] == [("BASE", 60), ("FOOD", 30),
                                                         ("S2BONUS", 100)]  # fmt: skip
    assert (await shop.points(card))["balance"] == 50 + 20 + 120
    # HQ revokes S2's points grant: its own rule earns no more (the group's still does).
    await admin.ok("DELETE", f"/v1/grants/{grant['id']}")
    admin.app[POINTS_KEY]._forget()  # no wait for POINTS_DEFINITIONS_CACHE_S
    after = await shop.one(shop.request(Kind.PURCHASE, card, "S2", amount=1_000))
    assert after.points == 20


async def test_concurrent_earnings_of_one_card_never_pass_the_daily_cap(
    admin: AdminClient,
) -> None:
    """Two POINTS_EARN of one card at the same moment from two stores (review finding: both
    read the day's earnings before either pinned its own)."""
    shop = await Shop(admin).make()
    await admin.ok("PATCH", "/v1/points/programs/CLUB/rules/BASE",
                   json={"cap_per_day_points": 100})  # fmt: skip
    card = await shop.card()
    earns = [shop.request(Kind.POINTS_EARN, card, store, amount=10_000) for store in ("S1", "S2")]
    answers = await asyncio.gather(*(shop.one(e) for e in earns))
    assert sorted(a.points or 0 for a in answers) == [0, 100], answers
    assert (await shop.points(card))["balance"] == 100


async def test_earnings_of_one_card_in_one_call_see_each_other(admin: AdminClient) -> None:
    """The points of one `handle` call are decided together: the second purchase of a card
    in the call sees the first one's points under the day's cap, and each answer's balance
    counts the earnings before it."""
    shop = await Shop(admin).make()
    card = await shop.card()
    two = [shop.request(Kind.PURCHASE, card, store, amount=4_000) for store in ("S1", "S2")]
    answers = await shop.pos.handle(two)
    assert [(a.points, a.points_balance) for a in answers] == [(40, 40), (40, 80)]
    await admin.ok("PATCH", "/v1/points/programs/CLUB/rules/BASE",
                   json={"cap_per_day_points": 100})  # fmt: skip
    two = [shop.request(Kind.PURCHASE, card, store, amount=4_000) for store in ("S1", "S2")]
    answers = await shop.pos.handle(two)
    assert [(a.points, a.points_balance) for a in answers] == [(20, 100), (0, 100)]
    assert (await shop.points(card))["balance"] == 100
    again = await shop.pos.handle(two)  # resent: the same answers, nothing added
    assert [(a.points, a.points_balance) for a in again] == [(20, 100), (0, 100)]
    assert (await shop.points(card))["balance"] == 100


async def test_a_refund_between_two_purchases_of_one_call_answers_the_true_balance(
    admin: AdminClient,
) -> None:
    """Review finding: a holder read again after its clawback already counted the later
    earning of the call, which was then added a second time."""
    shop = await Shop(admin).make()
    card = await shop.card()
    sale = await shop.one(shop.request(Kind.PURCHASE, card, amount=10_000))
    call = [
        shop.request(Kind.PURCHASE, card, amount=4_000),
        shop.request(Kind.REFUND, card, amount=5_000, rrn=sale.rrn),
        shop.request(Kind.PURCHASE, card, "S2", amount=3_000),
    ]
    answers = await shop.pos.handle(call)
    assert [a.points for a in answers] == [40, -50, 30]
    usable = (await shop.points(card))["usable"]
    assert usable == 100 + 40 - 50 + 30
    assert [a.points_balance for a in answers] == [usable] * 3


async def test_reversing_a_refund_after_its_debt_was_repaid_puts_the_points_back(
    admin: AdminClient,
) -> None:
    """Review finding: the clawback's debt leg, put back after a later earning repaid that
    debt, went past the debt (refused) and the points were lost. They go to the lot now."""
    shop = await Shop(admin).make()
    card = await shop.card()
    sale = await shop.one(shop.request(Kind.PURCHASE, card, amount=10_000))
    assert sale.points == 100
    spent = await shop.one(shop.request(Kind.POINTS_REDEEM, card, points=100))
    assert spent.outcome is Outcome.APPROVED
    refund = shop.request(Kind.REFUND, card, amount=5_000, rrn=sale.rrn)
    assert (await shop.one(refund)).points == -50  # all of it as debt: nothing left to take
    assert (await shop.points(card))["debt"] == 50
    assert (await shop.one(shop.request(Kind.PURCHASE, card, amount=8_000))).points == 80
    assert ((await shop.points(card))["debt"], (await shop.points(card))["usable"]) == (0, 30)
    undo = await shop.one(shop.request(Kind.REVERSE, None, stan=refund.stan))
    assert undo.outcome is Outcome.APPROVED
    view = await shop.points(card)
    assert (view["debt"], view["usable"]) == (0, 80), view


async def test_a_void_takes_the_earning_back_and_a_later_reversal_changes_nothing(
    admin: AdminClient,
) -> None:
    shop = await Shop(admin).make()
    card = await shop.card()
    sale = shop.request(Kind.PURCHASE, card, amount=5_000)
    assert (await shop.one(sale)).points == 50
    void = await shop.one(shop.request(Kind.VOID, card, amount=5_000, original_batch="000001",
                                       original_stan=sale.stan))  # fmt: skip
    assert void.outcome is Outcome.APPROVED
    assert void.points_balance == 0
    assert (await shop.points(card))["balance"] == 0
    reversal = await shop.one(shop.request(Kind.REVERSE, None, stan=sale.stan))
    assert reversal.outcome is Outcome.APPROVED
    assert (await shop.points(card))["balance"] == 0
    assert await shop.money(card) == 100_000


async def test_a_terminal_reversal_takes_the_earning_back_once(admin: AdminClient) -> None:
    shop = await Shop(admin).make()
    card = await shop.card()
    keep = await shop.one(shop.request(Kind.PURCHASE, card, amount=3_000))
    sale = shop.request(Kind.PURCHASE, card, amount=5_000)
    assert (await shop.one(sale)).points == 50
    reverse = shop.request(Kind.REVERSE, None, stan=sale.stan)
    for _ in range(2):
        assert (await shop.one(reverse)).outcome is Outcome.APPROVED
    assert keep.points == 30
    assert (await shop.points(card))["balance"] == 30
    assert await shop.money(card) == 100_000 - 3_000
    # The purchase resent after its reversal is declined, and earns nothing.
    late = await shop.one(sale)
    assert late.outcome is Outcome.REVERSED_BEFORE_ARRIVAL
    assert (await shop.points(card))["balance"] == 30


async def test_a_reversal_of_a_void_earns_again(admin: AdminClient) -> None:
    shop = await Shop(admin).make()
    card = await shop.card()
    sale = shop.request(Kind.PURCHASE, card, amount=5_000)
    await shop.one(sale)
    void = shop.request(Kind.VOID, card, amount=5_000, original_batch="000001",
                        original_stan=sale.stan)  # fmt: skip
    await shop.one(void)
    assert (await shop.points(card))["balance"] == 0
    assert (await shop.one(shop.request(Kind.REVERSE, None, stan=void.stan))).outcome is (
        Outcome.APPROVED
    )
    assert (await shop.points(card))["balance"] == 50
    assert await shop.money(card) == 100_000 - 5_000


async def test_a_reversed_or_voided_earning_gives_its_points_back_to_the_day_cap(
    admin: AdminClient, db_url: str
) -> None:
    """A rule capped at 100 points a day: a sale earning 100 reversed by its terminal frees
    the cap (the sale rung again earns 100); a void does too, and the void's reversal (the
    sale stands again) takes it once more, so a further sale that day earns nothing."""
    shop = await Shop(admin).make()
    await admin.ok("PATCH", f"/v1/points/programs/CLUB/rules/{RULE['code']}",
                   json={"cap_per_day_points": 100})  # fmt: skip
    card = await shop.card()
    sale = shop.request(Kind.PURCHASE, card, amount=10_000)
    assert (await shop.one(sale)).points == 100
    assert (await shop.one(shop.request(Kind.REVERSE, None, stan=sale.stan))).outcome is (
        Outcome.APPROVED
    )
    again = shop.request(Kind.PURCHASE, card, amount=10_000)
    assert (await shop.one(again)).points == 100
    void = shop.request(Kind.VOID, card, amount=10_000, original_batch="000001",
                        original_stan=again.stan)  # fmt: skip
    assert (await shop.one(void)).outcome is Outcome.APPROVED
    undo = await shop.one(shop.request(Kind.REVERSE, None, stan=void.stan))
    assert undo.outcome is Outcome.APPROVED
    assert (await shop.points(card))["balance"] == 100
    late = await shop.one(shop.request(Kind.PURCHASE, card, amount=10_000))
    assert (late.outcome, late.points) == (Outcome.APPROVED, 0)
    parts = await sql_rows(db_url, "SELECT SUM(points) AS s FROM points_earning_parts")
    assert parts[0]["s"] == 100
    # A void and then the terminal's 0400 of the same sale: the cap comes back once.
    other = await shop.card()
    sold = shop.request(Kind.PURCHASE, other, amount=10_000)
    assert (await shop.one(sold)).points == 100
    voided = shop.request(Kind.VOID, other, amount=10_000, original_batch="000001",
                          original_stan=sold.stan)  # fmt: skip
    assert (await shop.one(voided)).outcome is Outcome.APPROVED
    await shop.one(shop.request(Kind.REVERSE, None, stan=sold.stan))
    first = await shop.one(shop.request(Kind.PURCHASE, other, amount=10_000))
    second = await shop.one(shop.request(Kind.PURCHASE, other, amount=10_000))
    assert (first.points, second.points) == (100, 0)


async def test_a_purchase_whose_void_was_reversed_can_be_voided_again_and_again(
    admin: AdminClient,
) -> None:
    """The cashier's void lost its reply, the terminal reversed the void (the purchase
    stands again), and the cashier voids once more: that void is approved, gives the money
    and takes the points back, and each round of void and reversal does it exactly once. A
    resend of the purchase answers its approval while it stands, and is declined once it is
    voided; the batch counts the purchase only while it stands."""
    shop = await Shop(admin).make()
    card = await shop.card()
    sale = shop.request(Kind.PURCHASE, card, amount=5_000)
    assert (await shop.one(sale)).points == 50
    for round_ in range(3):
        void = shop.request(Kind.VOID, card, amount=5_000, original_batch="000001",
                            original_stan=sale.stan)  # fmt: skip
        for _ in range(2):  # the void and its resend
            voided = await shop.one(void)
            assert voided.outcome is Outcome.APPROVED, (round_, voided)
            assert await shop.money(card) == 100_000
            assert (await shop.points(card))["balance"] == 0
        resent = await shop.one(sale)
        assert resent.outcome is Outcome.REVERSED_BEFORE_ARRIVAL
        for _ in range(2):  # the terminal's 0400 of the void, and its resend
            back = await shop.one(shop.request(Kind.REVERSE, None, stan=void.stan))
            assert back.outcome is Outcome.APPROVED
            assert await shop.money(card) == 100_000 - 5_000
            assert (await shop.points(card))["balance"] == 50
        assert (await shop.one(sale)).outcome is Outcome.APPROVED  # it stands again

    def void_again() -> PosRequest:
        return shop.request(Kind.VOID, card, amount=5_000, original_batch="000001",
                            original_stan=sale.stan)  # fmt: skip

    last = void_again()
    assert (await shop.one(last)).outcome is Outcome.APPROVED
    assert (await shop.one(void_again())).outcome is Outcome.ALREADY_REVERSED  # voided now
    assert await shop.money(card) == 100_000
    assert (await shop.points(card))["balance"] == 0
    # That void reversed too; then the purchase's own 0400 (its reply was lost, say)
    # undoes it, once.
    await shop.one(shop.request(Kind.REVERSE, None, stan=last.stan))
    assert (await shop.points(card))["balance"] == 50
    for _ in range(2):
        undone = await shop.one(shop.request(Kind.REVERSE, None, stan=sale.stan))
        assert undone.outcome is Outcome.APPROVED
        assert await shop.money(card) == 100_000
        assert (await shop.points(card))["balance"] == 0
    assert (await shop.one(sale)).outcome is Outcome.REVERSED_BEFORE_ARRIVAL
    assert (await shop.one(void_again())).outcome is Outcome.ALREADY_REVERSED


async def test_a_returns_reversal_racing_a_debt_repayment_puts_back_what_it_took(
    admin: AdminClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """100 earned, 100 redeemed, half returned (50 of debt); the return's reversal reads the
    debt, and another till's purchase of the card arrives right then: it waits for the
    reversal (the holder's lock is held from the unpin to the put-back), so the put-back
    clears the debt and the purchase's 80 points land in full. Before, the purchase repaid
    the debt in the gap, the put-back was refused (no-overcredit) and 50 points were lost."""
    shop = await Shop(admin).make()
    points = admin.app[POINTS_KEY]
    card = await shop.card()
    sale = await shop.one(shop.request(Kind.PURCHASE, card, amount=10_000))
    await shop.one(shop.request(Kind.POINTS_REDEEM, card, points=100))
    refund = shop.request(Kind.REFUND, card, amount=5_000, rrn=sale.rrn)
    assert (await shop.one(refund)).points == -50
    assert (await shop.points(card))["debt"] == 50
    real = points._debt_aware
    elsewhere: list[asyncio.Task[PosResult]] = []

    async def then_a_purchase_elsewhere(earning: Any, ops: Any) -> Any:
        got = await real(earning, ops)
        request = shop.request(Kind.PURCHASE, card, "S2", amount=8_000)
        elsewhere.append(asyncio.ensure_future(shop.one(request)))
        await asyncio.sleep(0.2)  # the purchase runs as far as it can
        return got

    monkeypatch.setattr(points, "_debt_aware", then_a_purchase_elsewhere)
    assert (await shop.one(shop.request(Kind.REVERSE, None, stan=refund.stan))).outcome is (
        Outcome.APPROVED
    )
    assert (await elsewhere[0]).points == 80
    view = await shop.points(card)
    assert (view["debt"], view["usable"]) == (0, 80)


async def test_an_earning_that_never_reached_the_ledger_and_was_reversed_counts_nowhere(
    admin: AdminClient, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The points round pinned an earning, then the ledger was busy: 96, and the terminal's
    0400 tombstones the earning. Its counters and day-cap parts go with it, so the next
    purchase earns its 100 under a 100-point day cap (before, it earned 0)."""
    shop = await Shop(admin).make()
    await admin.ok("PATCH", "/v1/points/programs/CLUB/rules/BASE",
                   json={"cap_per_day_points": 100})  # fmt: skip
    points = admin.app[POINTS_KEY]
    card = await shop.card()
    real = points._earn_ops
    calls = itertools.count()

    async def busy_once(*args: Any, **kw: Any) -> Any:
        if next(calls) == 0:
            raise Busy("queue full")
        return await real(*args, **kw)

    monkeypatch.setattr(points, "_earn_ops", busy_once)
    sale = shop.request(Kind.PURCHASE, card, amount=10_000)
    assert (await shop.one(sale)).outcome is Outcome.UNAVAILABLE
    assert (await shop.one(shop.request(Kind.REVERSE, None, stan=sale.stan))).outcome is (
        Outcome.APPROVED
    )
    [row] = await sql_rows(db_url, "SELECT points, clawed FROM points_earnings")
    assert (row["points"], row["clawed"]) == (100, 100)
    again = await shop.one(shop.request(Kind.PURCHASE, card, amount=10_000))
    assert (again.points, (await shop.points(card))["balance"]) == (100, 100)


async def test_pb_is_what_the_card_can_spend_and_below_zero_only_under_negative(
    admin: AdminClient,
) -> None:
    """PB is the spendable points after (usable less the debt): under `negative` a void
    that leaves 100 owed answers -100; under `debt` points beside a debt are not counted
    as spendable (a 100-point redemption is refused, and PB said so before)."""
    shop = await Shop(admin).make(negative_policy="negative")
    card = await shop.card()
    sale = shop.request(Kind.PURCHASE, card, amount=10_000)
    await shop.one(sale)
    await shop.one(shop.request(Kind.POINTS_REDEEM, card, points=100))
    void = await shop.one(shop.request(Kind.VOID, card, amount=10_000, original_batch="000001",
                                       original_stan=sale.stan))  # fmt: skip
    assert (void.points, void.points_balance) == (-100, -100)
    assert (await shop.points(card))["balance"] == -100
    small = await shop.one(shop.request(Kind.PURCHASE, card, amount=3_000))
    assert (small.points, small.points_balance) == (30, -70)  # repaid 30 of the debt


async def test_pb_does_not_count_points_that_sit_beside_a_debt(admin: AdminClient) -> None:
    shop = await Shop(admin).make()
    card = await shop.card()
    sale = await shop.one(shop.request(Kind.PURCHASE, card, amount=10_000))
    path = f"/v1/cards/{card['id']}/points"
    await admin.ok("POST", f"{path}/redemptions",
                   json={"points": 100, "reward": "mug", "key": "r1"})  # fmt: skip
    await shop.one(shop.request(Kind.REFUND, card, amount=10_000, rrn=sale.rrn))
    await admin.ok("POST", f"{path}/redemptions/r1/reversal")  # 100 back beside 100 owed
    small = await shop.one(shop.request(Kind.PURCHASE, card, amount=100))
    assert (small.points, small.points_balance) == (1, 1)
    two = await shop.one(shop.request(Kind.POINTS_REDEEM, card, points=100))
    assert (two.outcome, two.points_balance) == (Outcome.INSUFFICIENT_FUNDS, 1)


async def test_an_active_rule_earns_however_many_retired_rules_come_before_it(
    admin: AdminClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Retired rules are kept (history); the rules read for earning are the active ones,
    so an active rule late in code order still earns (a bound of 4 active rules here, so
    17 retired ones are past what a read of every row took)."""
    monkeypatch.setattr(limits, "POINTS_RULES_PER_PROGRAM_MAX", 4)
    shop = await Shop(admin).make()
    path = "/v1/points/programs/CLUB/rules"
    await admin.ok("PATCH", f"{path}/BASE", json={"state": "retired"})
    for n in range(17):
        await admin.ok("POST", path, json={"code": f"OLD{n:02d}", "kind": "base", "points": 1,
                                           "per_fen": 100})  # fmt: skip
        await admin.ok("PATCH", f"{path}/OLD{n:02d}", json={"state": "retired"})
    await admin.ok("POST", path, json={"code": "ZNEW", "kind": "base", "points": 2,
                                       "per_fen": 100})  # fmt: skip
    card = await shop.card()
    assert (await shop.one(shop.request(Kind.PURCHASE, card, amount=10_000))).points == 200


async def test_a_category_rule_earns_on_the_lines_of_its_categories(admin: AdminClient) -> None:
    """`BL` lines may carry a category after the department (`FOOD/DAIRY=600`): a category
    rule earns on those lines; a department rule still sees the department."""
    shop = await Shop(admin).make()
    path = "/v1/points/programs/CLUB/rules"
    await admin.ok("PATCH", f"{path}/BASE", json={"state": "retired"})
    await admin.ok("POST", path, json={"code": "DAIRY", "kind": "category", "points": 3,
                                       "per_fen": 100, "categories": ["DAIRY"]})  # fmt: skip
    await admin.ok("POST", path, json={"code": "TOYS", "kind": "category", "points": 1,
                                       "per_fen": 100, "departments": ["TOYS"]})  # fmt: skip
    card = await shop.card()
    basket = (("FOOD/DAIRY", 600), ("FOOD/BREAD", 300), ("TOYS/LEGO", 1_000))
    sale = await shop.one(shop.request(Kind.PURCHASE, card, amount=1_900, basket=basket))
    assert sale.points == 18 + 10


async def test_a_reversal_the_ledger_refuses_gives_no_points_back(admin: AdminClient) -> None:
    """The reversal of a void whose money was spent again is refused by the ledger (the
    card cannot go below zero): the void's points stay taken back too (review finding)."""
    shop = await Shop(admin).make()
    card = await shop.card(balance=5_000)
    sale = shop.request(Kind.PURCHASE, card, amount=5_000)
    assert (await shop.one(sale)).points == 50
    void = shop.request(Kind.VOID, card, amount=5_000, original_batch="000001",
                        original_stan=sale.stan)  # fmt: skip
    assert (await shop.one(void)).points == -50
    assert (await shop.one(shop.request(Kind.PURCHASE, card, amount=5_000))).points == 50
    refused = await shop.one(shop.request(Kind.REVERSE, None, stan=void.stan))
    assert refused.outcome is Outcome.ALREADY_REVERSED
    assert (await shop.points(card))["balance"] == 50
    assert await shop.money(card) == 0


async def test_refunds_claw_back_their_share_and_parts_sum_to_the_whole(
    admin: AdminClient, db_url: str
) -> None:
    shop = await Shop(admin).make()
    card = await shop.card()
    sale = await shop.one(shop.request(Kind.PURCHASE, card, amount=10_000))
    assert sale.points == 100
    first = await shop.one(shop.request(Kind.REFUND, card, amount=2_550, rrn=sale.rrn))
    assert first.outcome is Outcome.APPROVED
    assert (first.points, first.points_balance) == (-25, 75)
    second = shop.request(Kind.REFUND, card, amount=2_550, rrn=sale.rrn)
    answer = await shop.one(second)
    assert (answer.points, answer.points_balance) == (-26, 49)  # floor(51) - 25
    assert (await shop.one(second)).points_balance == 49  # a resend takes nothing more
    [earning] = await sql_rows(db_url, "SELECT * FROM points_earnings")
    assert (earning["returned"], earning["clawed"]) == (5_100, 51)
    assert len(await sql_rows(db_url, "SELECT * FROM points_clawbacks")) == 2
    # The terminal reverses the second refund: its points come back exactly.
    await shop.one(shop.request(Kind.REVERSE, None, stan=second.stan))
    assert (await shop.points(card))["balance"] == 75


async def test_a_refund_of_a_points_free_purchase_takes_nothing(admin: AdminClient) -> None:
    shop = await Shop(admin).make()
    card = await shop.card()
    sale = await shop.one(shop.request(Kind.PURCHASE, card, amount=50))  # under 1 CNY: 0 points
    assert (sale.points, sale.points_balance) == (0, 0)
    refund = await shop.one(shop.request(Kind.REFUND, card, amount=50, rrn=sale.rrn))
    assert refund.outcome is Outcome.APPROVED
    assert refund.points is None


async def test_points_earn_on_another_tender_moves_no_money_and_is_idempotent(
    admin: AdminClient, db_url: str
) -> None:
    shop = await Shop(admin).make()
    card = await shop.card()
    earn = shop.request(Kind.POINTS_EARN, card, amount=8_800)
    first = await shop.one(earn)
    assert (first.outcome, first.points, first.points_balance) == (Outcome.APPROVED, 88, 88)
    again = await shop.one(earn)
    assert (again.points, again.replayed) == (88, True)
    assert await shop.money(card) == 100_000
    assert (await shop.points(card))["balance"] == 88
    assert (await shop.one(shop.request(Kind.REVERSE, None, stan=earn.stan))).outcome is (
        Outcome.APPROVED
    )
    assert (await shop.points(card))["balance"] == 0
    assert (await shop.one(earn)).outcome is Outcome.REVERSED_BEFORE_ARRIVAL
    # A reversal that overtakes its POINTS_EARN: the late earning is refused.
    late = shop.request(Kind.POINTS_EARN, card, amount=1_000)
    await shop.one(shop.request(Kind.REVERSE, None, stan=late.stan))
    assert (await shop.one(late)).outcome is Outcome.REVERSED_BEFORE_ARRIVAL
    assert (await shop.points(card))["balance"] == 0
    plain = await shop.card("PLAIN")
    refused = await shop.one(shop.request(Kind.POINTS_EARN, plain, amount=1_000))
    assert (refused.outcome, refused.refusal) == (Outcome.NOT_PERMITTED, "points_no_program")
    bad = await shop.one(shop.request(Kind.POINTS_EARN, card, amount=0))
    assert bad.outcome is Outcome.BAD_REQUEST


async def test_settlement_totals_count_no_points_transfers(admin: AdminClient) -> None:
    shop = await Shop(admin).make()
    card = await shop.card()
    sale = await shop.one(shop.request(Kind.PURCHASE, card, amount=4_000))
    await shop.one(shop.request(Kind.PURCHASE, card, amount=1_000))
    await shop.one(shop.request(Kind.REFUND, card, amount=2_000, rrn=sale.rrn))
    await shop.one(shop.request(Kind.POINTS_EARN, card, amount=9_900))
    terminal = await shop.pos.directory.terminal(shop.tids["S1"])
    assert terminal is not None
    lines = await shop.pos.directory.batch_lines(f"{terminal.tid}/0/000001/")
    assert {x.reason for x in lines} >= {"points_earn", "points_clawback"}
    assert batch_totals(lines) == (5_000, 2, 2_000, 1)
    settle = await shop.one(shop.request(Kind.SETTLE, None, totals=(5_000, 2, 2_000, 1)))
    assert settle.balanced is True


async def test_a_reversal_after_a_refund_takes_back_only_what_is_left(
    admin: AdminClient, db_url: str
) -> None:
    shop = await Shop(admin).make()
    card = await shop.card()
    keep = await shop.one(shop.request(Kind.PURCHASE, card, amount=2_000))
    sale = shop.request(Kind.PURCHASE, card, amount=10_000)
    answer = await shop.one(sale)
    await shop.one(shop.request(Kind.REFUND, card, amount=2_500, rrn=answer.rrn))
    assert (await shop.points(card))["balance"] == 20 + 75
    await shop.one(shop.request(Kind.REVERSE, None, stan=sale.stan))
    view = await shop.points(card)
    assert (view["balance"], view["debt"]) == (keep.points, 0)
    [earning] = await sql_rows(db_url, "SELECT * FROM points_earnings WHERE source <> ''"
                               " AND points = 100")  # fmt: skip
    assert (earning["returned"], earning["clawed"]) == (10_000, 100)


# --- returns of purchases paid another way (POINTS_RETURN, 980000) -----------------------------


async def earned_otherwise(admin: AdminClient) -> tuple[Shop, dict[str, Any], PosResult]:
    """A shop, a card of class PTS, and its 900000 of 100.00 paid otherwise (100 points)."""
    shop = await Shop(admin).make()
    card = await shop.card()
    earn = await shop.one(shop.request(Kind.POINTS_EARN, card, amount=10_000))
    return shop, card, earn


async def test_returns_of_a_cash_purchase_claw_back_their_share_floored_to_the_whole(
    admin: AdminClient, db_url: str
) -> None:
    """Three returns of one POINTS_EARN: each takes floor(points x returned so far / amount)
    less what the ones before took, so the parts sum to the whole earning; the card's money
    is not touched and settlement totals count none of it."""
    shop, card, earn = await earned_otherwise(admin)
    assert (earn.points, earn.rrn != "") == (100, True)
    answers = [
        await shop.one(shop.request(Kind.POINTS_RETURN, card, amount=fen, rrn=earn.rrn))
        for fen in (3_333, 3_333, 3_334)
    ]
    assert [a.outcome for a in answers] == [Outcome.APPROVED] * 3
    assert [(a.points, a.points_balance) for a in answers] == [(-33, 67), (-33, 34), (-34, 0)]
    assert all(a.rrn and a.auth_code for a in answers)
    [earning] = await sql_rows(db_url, "SELECT * FROM points_earnings")
    assert (earning["returned"], earning["clawed"]) == (10_000, 100)
    assert (await shop.points(card))["balance"] == 0
    assert await shop.money(card) == 100_000
    terminal = await shop.pos.directory.terminal(shop.tids["S1"])
    assert terminal is not None
    lines = await shop.pos.directory.batch_lines(f"{terminal.tid}/0/000001/")
    assert {x.reason for x in lines} == {"points_earn", "points_clawback"}
    assert batch_totals(lines) == (0, 0, 0, 0)


async def test_a_return_over_what_is_left_of_the_earning_is_refused_with_nothing_changed(
    admin: AdminClient, db_url: str
) -> None:
    shop, card, earn = await earned_otherwise(admin)
    first = await shop.one(shop.request(Kind.POINTS_RETURN, card, amount=6_000, rrn=earn.rrn))
    assert (first.points, first.points_balance) == (-60, 40)
    over = await shop.one(shop.request(Kind.POINTS_RETURN, card, amount=4_001, rrn=earn.rrn))
    assert (over.outcome, over.refusal) == (Outcome.REFUND_EXCEEDS_ORIGINAL,
                                            "return_exceeds_original")  # fmt: skip
    assert (over.points, over.rrn) == (None, "")
    assert (await shop.points(card))["balance"] == 40
    [earning] = await sql_rows(db_url, "SELECT * FROM points_earnings")
    assert (earning["returned"], earning["clawed"]) == (6_000, 60)
    assert len(await sql_rows(db_url, "SELECT * FROM points_clawbacks")) == 1
    rest = await shop.one(shop.request(Kind.POINTS_RETURN, card, amount=4_000, rrn=earn.rrn))
    assert (rest.points, rest.points_balance) == (-40, 0)
    more = await shop.one(shop.request(Kind.POINTS_RETURN, card, amount=1, rrn=earn.rrn))
    assert more.outcome is Outcome.REFUND_EXCEEDS_ORIGINAL


async def test_a_resent_return_is_answered_the_same_and_takes_nothing_twice(
    admin: AdminClient, db_url: str
) -> None:
    shop, card, earn = await earned_otherwise(admin)
    back = shop.request(Kind.POINTS_RETURN, card, amount=2_550, rrn=earn.rrn)
    first = await shop.one(back)
    assert (first.outcome, first.points, first.points_balance) == (Outcome.APPROVED, -25, 75)
    again = await shop.one(back)
    assert (again.points, again.points_balance, again.rrn, again.replayed) == (
        -25, 75, first.rrn, True)  # fmt: skip
    both = await shop.pos.handle([back, back])
    assert [(a.points, a.rrn) for a in both] == [(-25, first.rrn)] * 2
    assert (await shop.points(card))["balance"] == 75
    [earning] = await sql_rows(db_url, "SELECT * FROM points_earnings")
    assert (earning["returned"], earning["clawed"]) == (2_550, 25)
    # The same key with other content is another transaction: 94, nothing done.
    other = PosRequest(**{**_fields(back), "amount": 2_000})
    assert (await shop.one(other)).outcome is Outcome.DUPLICATE_MISMATCH
    assert (await shop.points(card))["balance"] == 75
    assert len(await sql_rows(db_url, "SELECT * FROM points_clawbacks")) == 1


async def test_a_reversal_of_a_return_restores_exactly_the_lots_it_took(
    admin: AdminClient, db_url: str
) -> None:
    """The return takes the earning's own lot first (what is left of it after a
    redemption), then the latest-expiring lot; its 0400 puts back exactly those points
    into those lots, once, and the earning's counters with them."""
    shop = await Shop(admin).make(
        expiry={"kind": "rolling_months", "months": 3}, redeem_points=10, redeem_fen=10
    )
    service = admin.app[POINTS_KEY]
    card = await shop.card()
    january, march = 1_768_000_000_000, 1_773_000_000_000  # 2026-01-10, 2026-03-08
    service.clock_ms = lambda: january
    earn = await shop.one(shop.request(Kind.POINTS_EARN, card, amount=10_000))  # to April
    service.clock_ms = lambda: march - 1
    await shop.one(shop.request(Kind.PURCHASE, card, amount=5_000))  # 50, to end of June
    service.clock_ms = lambda: march
    spent = await shop.one(shop.request(Kind.POINTS_REDEEM, card, points=80))  # January's
    assert spent.outcome is Outcome.APPROVED
    before = (await shop.points(card))["lots"]
    assert [(lot["remaining"], lot["expires_on"]) for lot in before] == [
        (20, "2026-04-30"), (50, "2026-06-30")]  # fmt: skip
    back = shop.request(Kind.POINTS_RETURN, card, amount=6_000, rrn=earn.rrn)
    assert ((await shop.one(back)).points, (await shop.one(back)).points_balance) == (-60, 10)
    taken = (await shop.points(card))["lots"]
    assert [(lot["remaining"], lot["expires_on"]) for lot in taken] == [(10, "2026-06-30")]
    reverse = shop.request(Kind.REVERSE, None, stan=back.stan)
    for _ in range(2):
        assert (await shop.one(reverse)).outcome is Outcome.APPROVED
    assert (await shop.points(card))["lots"] == before
    [earning] = await sql_rows(db_url, "SELECT * FROM points_earnings WHERE source = ''")
    assert (earning["returned"], earning["clawed"]) == (0, 0)
    # Resent after its reversal: refused, and nothing taken again.
    assert (await shop.one(back)).outcome is Outcome.REVERSED_BEFORE_ARRIVAL
    assert (await shop.points(card))["lots"] == before
    # A reversal that overtook its return: the late return is refused, nothing pinned.
    late = shop.request(Kind.POINTS_RETURN, card, amount=1_000, rrn=earn.rrn)
    assert (await shop.one(shop.request(Kind.REVERSE, None, stan=late.stan))).outcome is (
        Outcome.APPROVED
    )
    assert (await shop.one(late)).outcome is Outcome.REVERSED_BEFORE_ARRIVAL
    assert (await shop.points(card))["lots"] == before
    [earning] = await sql_rows(db_url, "SELECT * FROM points_earnings WHERE source = ''")
    assert (earning["returned"], earning["clawed"]) == (0, 0)
    await admin.app[LEDGER_KEY].store.verify(100)


async def test_a_return_of_less_than_a_point_is_approved_and_its_reversal_gives_the_fen_back(
    admin: AdminClient, db_url: str
) -> None:
    shop, card, earn = await earned_otherwise(admin)
    small = shop.request(Kind.POINTS_RETURN, card, amount=50, rrn=earn.rrn)
    answer = await shop.one(small)
    assert (answer.outcome, answer.points, answer.points_balance) == (Outcome.APPROVED, 0, 100)
    await shop.one(shop.request(Kind.REVERSE, None, stan=small.stan))
    [earning] = await sql_rows(db_url, "SELECT * FROM points_earnings")
    assert (earning["returned"], earning["clawed"]) == (0, 0)
    whole = await shop.one(shop.request(Kind.POINTS_RETURN, card, amount=10_000, rrn=earn.rrn))
    assert (whole.points, whole.points_balance) == (-100, 0)


async def test_returns_around_a_reversed_return_never_take_more_than_the_earning(
    admin: AdminClient, db_url: str
) -> None:
    """100 points on 100.00: 1.50 returned (1 point), 98.50 returned (99), the 1.50 return
    reversed (1 point back), 1.50 returned again: 1 point (cumulatively 100), never 2 with
    a point of debt; the same with card refunds of a card purchase."""
    shop, card, earn = await earned_otherwise(admin)
    first = shop.request(Kind.POINTS_RETURN, card, amount=150, rrn=earn.rrn)
    assert (await shop.one(first)).points == -1
    rest = await shop.one(shop.request(Kind.POINTS_RETURN, card, amount=9_850, rrn=earn.rrn))
    assert rest.points == -99
    assert (await shop.one(shop.request(Kind.REVERSE, None, stan=first.stan))).outcome is (
        Outcome.APPROVED
    )
    again = await shop.one(shop.request(Kind.POINTS_RETURN, card, amount=150, rrn=earn.rrn))
    assert (again.points, again.points_balance) == (-1, 0)
    [earning] = await sql_rows(db_url, "SELECT * FROM points_earnings")
    assert (earning["returned"], earning["clawed"]) == (10_000, 100)
    assert (await shop.points(card))["debt"] == 0
    other = await shop.card()
    sale = await shop.one(shop.request(Kind.PURCHASE, other, amount=10_000))
    refund = shop.request(Kind.REFUND, other, amount=150, rrn=sale.rrn)
    assert (await shop.one(refund)).points == -1
    most = await shop.one(shop.request(Kind.REFUND, other, amount=9_850, rrn=sale.rrn))
    assert most.points == -99
    assert (await shop.one(shop.request(Kind.REVERSE, None, stan=refund.stan))).outcome is (
        Outcome.APPROVED
    )
    last = await shop.one(shop.request(Kind.REFUND, other, amount=150, rrn=sale.rrn))
    assert last.points == -1
    view = await shop.points(other)
    assert (view["balance"], view["debt"]) == (0, 0)


async def test_a_returns_reversal_after_the_earnings_own_reversal_puts_nothing_back(
    admin: AdminClient,
) -> None:
    """A cash purchase earns 100, half is returned (50 back), then the terminal reverses the
    earning (the other 50) and then the return: nothing earned stands, so nothing comes
    back (as the money ledger never takes back a refund of a reversed purchase). In the
    other order the return's points come back first and the earning's reversal takes all."""
    shop = await Shop(admin).make()
    for earning_first in (True, False):
        card = await shop.card()
        earn_request = shop.request(Kind.POINTS_EARN, card, amount=10_000)
        earn = await shop.one(earn_request)
        ret = shop.request(Kind.POINTS_RETURN, card, amount=5_000, rrn=earn.rrn)
        assert (await shop.one(ret)).points == -50
        order = [earn_request, ret] if earning_first else [ret, earn_request]
        for target in order:
            undo = await shop.one(shop.request(Kind.REVERSE, None, stan=target.stan))
            assert undo.outcome is Outcome.APPROVED
        view = await shop.points(card)
        assert (view["balance"], view["debt"]) == (0, 0), (earning_first, view)


async def test_a_return_naming_no_earning_of_this_card_is_refused(
    admin: AdminClient, db_url: str
) -> None:
    shop = await Shop(admin).make()
    card, other = await shop.card(), await shop.card()
    earn = await shop.one(shop.request(Kind.POINTS_EARN, card, amount=10_000))
    sale = await shop.one(shop.request(Kind.PURCHASE, card, amount=5_000))  # paid by the card

    def back(who: dict[str, Any], **fields: Any) -> PosRequest:
        return shop.request(Kind.POINTS_RETURN, who, **{"amount": 1_000, "rrn": earn.rrn,
                                                         **fields})  # fmt: skip

    for request, outcome in (
        (back(other), Outcome.ORIGINAL_MISMATCH),  # another card's earning
        (back(card, rrn=sale.rrn), Outcome.ORIGINAL_NOT_FOUND),  # a card purchase: refund it
        (back(card, rrn="000099999999"), Outcome.ORIGINAL_NOT_FOUND),
        (back(card, amount=0), Outcome.BAD_REQUEST),
        (back(card, rrn=""), Outcome.BAD_REQUEST),
        (back(await shop.card("PLAIN")), Outcome.ORIGINAL_MISMATCH),
    ):
        answer = await shop.one(request)
        assert (answer.outcome, answer.points) == (outcome, None), request
    assert [(await shop.points(c))["balance"] for c in (card, other)] == [150, 0]
    assert await sql_rows(db_url, "SELECT * FROM points_clawbacks") == []
    # A refund of stored value never names a 900000: its points come back by 980000 only.
    refund = await shop.one(shop.request(Kind.REFUND, card, amount=1_000, rrn=earn.rrn))
    assert refund.outcome is Outcome.ORIGINAL_NOT_FOUND
    # The 900000 reversed: a return of it has nothing to take back.
    earned = shop.request(Kind.POINTS_EARN, card, amount=2_000)
    gone = await shop.one(earned)
    await shop.one(shop.request(Kind.REVERSE, None, stan=earned.stan))
    late = await shop.one(back(card, rrn=gone.rrn))
    assert late.outcome is Outcome.ALREADY_REVERSED
    assert (await shop.points(card))["balance"] == 150


async def test_a_frozen_card_earns_nothing_more_but_its_returns_take_points_back(
    admin: AdminClient,
) -> None:
    """A return takes back as a refund gives back: from a card frozen (or lost) since the
    earning too, or the points it earned on goods returned would stay on it."""
    shop, card, earn = await earned_otherwise(admin)
    await admin.ok("POST", f"/v1/cards/{card['id']}/freeze")
    refused = await shop.one(shop.request(Kind.POINTS_EARN, card, amount=10_000))
    assert refused.outcome is Outcome.CARD_FROZEN
    back = await shop.one(shop.request(Kind.POINTS_RETURN, card, amount=10_000, rrn=earn.rrn))
    assert (back.outcome, back.points, back.points_balance) == (Outcome.APPROVED, -100, 0)


async def test_a_purchase_under_the_key_of_a_points_return_is_answered_94(
    admin: AdminClient, db_url: str
) -> None:
    """A POINTS_RETURN claims its key (terminal, batch, STAN) for its function: a purchase
    or a 900000 sent under it is another transaction, answered 94 with nothing done."""
    shop, card, earn = await earned_otherwise(admin)
    stan = "005151"
    back = await shop.one(shop.request(Kind.POINTS_RETURN, card, amount=5_000, rrn=earn.rrn,
                                       stan=stan))  # fmt: skip
    assert back.points == -50
    sale = await shop.one(shop.request(Kind.PURCHASE, card, amount=10_000, stan=stan))
    assert sale.outcome is Outcome.DUPLICATE_MISMATCH
    again = await shop.one(shop.request(Kind.POINTS_EARN, card, amount=10_000, stan=stan))
    assert again.outcome is Outcome.DUPLICATE_MISMATCH
    assert (await shop.points(card))["balance"] == 50
    assert await shop.money(card) == 100_000
    assert await sql_rows(db_url, "SELECT * FROM ledger_transfers WHERE reason = 'purchase'") == []
    # And the other way round: a return under a purchase's key.
    paid = shop.request(Kind.PURCHASE, card, amount=1_000)
    await shop.one(paid)
    clash = shop.request(Kind.POINTS_RETURN, card, amount=1_000, rrn=earn.rrn, stan=paid.stan)
    assert (await shop.one(clash)).outcome is Outcome.DUPLICATE_MISMATCH
    assert (await shop.points(card))["balance"] == 60


def _fields(r: PosRequest) -> dict[str, Any]:
    return {name: getattr(r, name) for name in r.__dataclass_fields__}


# --- redemption ---------------------------------------------------------------------------------


async def test_points_pay_part_of_a_bill_in_whole_blocks(admin: AdminClient, db_url: str) -> None:
    shop = await Shop(admin).make(redeem_points=100, redeem_fen=50)
    card = await shop.card()
    await shop.one(shop.request(Kind.PURCHASE, card, amount=50_000))  # 500 points
    sales = await sql_rows(db_url, "SELECT a.id FROM ledger_accounts a WHERE owner_kind = "
                           "'store' AND owner_id = 'S1' AND purpose = 'sales'")  # fmt: skip
    redeem = shop.request(Kind.POINTS_REDEEM, card, points=300)
    paid = await shop.one(redeem)
    assert paid.outcome is Outcome.APPROVED
    assert (paid.amount, paid.points, paid.points_balance) == (150, 300, 200)
    again = await shop.one(redeem)
    assert (again.outcome, again.amount, again.points, again.replayed) == (
        Outcome.APPROVED,
        150,
        300,
        True,
    )
    assert (await shop.points(card))["balance"] == 200
    assert await shop.money(card) == 100_000 - 50_000  # the card's money is not touched
    [funding] = await sql_rows(db_url, "SELECT debits_posted FROM ledger_accounts WHERE "
                               "purpose = 'points_funding'")  # fmt: skip
    assert funding["debits_posted"] == 150
    [sale] = await sql_rows(db_url, "SELECT credits_posted FROM ledger_accounts WHERE id = :i",
                            i=sales[0]["id"])  # fmt: skip
    assert sale["credits_posted"] == 50_000 + 150
    for points, outcome, refusal in (
        (250, Outcome.BAD_REQUEST, "redeem_not_whole_blocks"),
        (300, Outcome.INSUFFICIENT_FUNDS, "points_insufficient"),
    ):
        no = await shop.one(shop.request(Kind.POINTS_REDEEM, card, points=points))
        assert (no.outcome, no.refusal) == (outcome, refusal)
    assert (await shop.points(card))["balance"] == 200
    plain = await shop.card("PLAIN")
    no = await shop.one(shop.request(Kind.POINTS_REDEEM, plain, points=100))
    assert (no.outcome, no.refusal) == (Outcome.NOT_PERMITTED, "points_no_program")


async def test_points_spent_as_money_need_the_cards_pin_and_its_lockout_holds(
    admin: AdminClient,
) -> None:
    """A 910000 pays with points as a purchase pays with money: on a card with a PIN it
    needs F52 (55 without it), a wrong one is counted, and once the PIN is locked even the
    right one is 75; nothing is spent by a refusal."""
    shop = await Shop(admin).make()
    card = await shop.card()
    await shop.one(shop.request(Kind.PURCHASE, card, amount=50_000))  # 500 points
    await admin.ok("POST", f"/v1/cards/{card['id']}/pin", json={"pin": "123456"})
    right, wrong = block("123456", card["pan"]), block("999999", card["pan"])
    bare = await shop.one(shop.request(Kind.POINTS_REDEEM, card, points=100))
    assert bare.outcome is Outcome.PIN_REQUIRED
    paid = await shop.one(shop.request(Kind.POINTS_REDEEM, card, points=100, pin_block=right))
    assert (paid.outcome, paid.points_balance) == (Outcome.APPROVED, 400)
    for _ in range(3):
        bad = await shop.one(shop.request(Kind.POINTS_REDEEM, card, points=100, pin_block=wrong))
        assert bad.outcome in (Outcome.PIN_WRONG, Outcome.PIN_LOCKED)
    locked = await shop.one(shop.request(Kind.POINTS_REDEEM, card, points=100, pin_block=right))
    assert locked.outcome is Outcome.PIN_LOCKED
    assert (await shop.points(card))["balance"] == 400


async def test_a_redemption_reversed_restores_exactly_the_lots_it_took(
    admin: AdminClient, db_url: str
) -> None:
    shop = await Shop(admin).make(
        expiry={"kind": "rolling_months", "months": 3}, redeem_points=10, redeem_fen=10
    )
    service = admin.app[POINTS_KEY]
    card = await shop.card()
    january, march = 1_768_000_000_000, 1_773_000_000_000  # 2026-01-10, 2026-03-08
    service.clock_ms = lambda: january
    await shop.one(shop.request(Kind.PURCHASE, card, amount=10_000))  # 100, to end of April
    service.clock_ms = lambda: march - 1
    await shop.one(shop.request(Kind.PURCHASE, card, amount=5_000))  # 50, to end of June
    service.clock_ms = lambda: march
    before = (await shop.points(card))["lots"]
    assert [lot["remaining"] for lot in before] == [100, 50]
    assert [lot["expires_on"] for lot in before] == ["2026-04-30", "2026-06-30"]
    redeem = shop.request(Kind.POINTS_REDEEM, card, points=120)
    assert (await shop.one(redeem)).points_balance == 30
    taken = (await shop.points(card))["lots"]
    assert [lot["remaining"] for lot in taken] == [30]  # the earliest expiry went first
    reverse = shop.request(Kind.REVERSE, None, stan=redeem.stan)
    for _ in range(2):
        assert (await shop.one(reverse)).outcome is Outcome.APPROVED
    assert (await shop.points(card))["lots"] == before
    [funding] = await sql_rows(db_url, "SELECT debits_posted, credits_posted FROM "
                               "ledger_accounts WHERE purpose = 'points_funding'")  # fmt: skip
    assert funding["debits_posted"] == funding["credits_posted"] == 120
    assert (await shop.one(redeem)).outcome is Outcome.REVERSED_BEFORE_ARRIVAL
    # A reversal that overtakes its redemption: the late redemption is refused.
    late = shop.request(Kind.POINTS_REDEEM, card, points=100)
    await shop.one(shop.request(Kind.REVERSE, None, stan=late.stan))
    assert (await shop.one(late)).outcome is Outcome.REVERSED_BEFORE_ARRIVAL
    assert (await shop.points(card))["lots"] == before


async def test_a_redemption_at_another_entitys_store_clears_between_entities(
    admin: AdminClient, db_url: str
) -> None:
    shop = await Shop(admin).make()
    await admin.org("LE2", "S3")
    await admin.ok("POST", "/v1/grants", json={"store": "S3", "function": "stored_value"})
    answer = await admin.ok("POST", "/v1/terminals", json={"tid": "PX000001",
                            "mid": "M99999999999999", "store": "S3"})  # fmt: skip
    from tests import logscan  # noqa: PLC0415

    logscan.SCAN.remember("a terminal master key", answer["tmk"])
    shop.tids["S3"] = "PX000001"
    card = await shop.card()
    await shop.one(shop.request(Kind.PURCHASE, card, amount=20_000))
    paid = await shop.one(shop.request(Kind.POINTS_REDEEM, card, "S3", points=100))
    assert (paid.outcome, paid.amount) == (Outcome.APPROVED, 100)
    rows = await sql_rows(db_url, "SELECT legal_entity, owner_id, purpose, debits_posted, "
                          "credits_posted FROM ledger_accounts WHERE purpose IN "
                          "('due_to', 'due_from', 'points_funding')")  # fmt: skip
    got = {(r["legal_entity"], r["purpose"]): (r["debits_posted"], r["credits_posted"])
           for r in rows}  # fmt: skip
    assert got[("LE1", "points_funding")] == (100, 0)
    assert got[("LE1", "due_to")] == (0, 100)
    assert got[("LE2", "due_from")] == (100, 0)


async def test_a_void_after_the_points_were_spent_records_a_debt(admin: AdminClient) -> None:
    shop = await Shop(admin).make()
    card = await shop.card()
    sale = shop.request(Kind.PURCHASE, card, amount=10_000)
    await shop.one(sale)
    await shop.one(shop.request(Kind.POINTS_REDEEM, card, points=100))
    void = await shop.one(shop.request(Kind.VOID, card, amount=10_000, original_batch="000001",
                                       original_stan=sale.stan))  # fmt: skip
    assert void.outcome is Outcome.APPROVED
    view = await shop.points(card)
    assert (view["balance"], view["usable"], view["debt"]) == (0, 0, 100)
    await admin.ok("PATCH", "/v1/points/programs/CLUB", json={"negative_policy": "negative"})
    assert (await shop.points(card))["balance"] == -100


async def test_later_earnings_repay_a_debt_first_and_their_reversal_owes_it_again(
    admin: AdminClient, db_url: str
) -> None:
    shop = await Shop(admin).make()
    card = await shop.card()
    sale = shop.request(Kind.PURCHASE, card, amount=10_000)
    await shop.one(sale)
    await shop.one(shop.request(Kind.POINTS_REDEEM, card, points=100))
    await shop.one(shop.request(Kind.VOID, card, amount=10_000, original_batch="000001",
                                original_stan=sale.stan))  # fmt: skip
    assert (await shop.points(card))["debt"] == 100
    later = shop.request(Kind.PURCHASE, card, amount=15_000)
    answer = await shop.one(later)
    assert (answer.points, answer.points_balance) == (150, 50)
    view = await shop.points(card)
    assert (view["balance"], view["debt"]) == (50, 0)
    [row] = await sql_rows(db_url, "SELECT debt_repaid FROM points_earnings WHERE points = 150")
    assert row["debt_repaid"] == 100
    assert (await shop.one(later)).points_balance == 50  # a resend repays nothing twice
    await shop.one(shop.request(Kind.REVERSE, None, stan=later.stan))
    view = await shop.points(card)
    assert (view["balance"], view["debt"]) == (0, 100)
    # A POINTS_EARN repays too, and its reversal puts the debt back.
    earn = shop.request(Kind.POINTS_EARN, card, amount=12_000)
    assert (await shop.one(earn)).points_balance == 20
    assert (await shop.points(card))["debt"] == 0
    await shop.one(shop.request(Kind.REVERSE, None, stan=earn.stan))
    view = await shop.points(card)
    assert (view["balance"], view["debt"]) == (0, 100)


async def test_the_history_shows_every_move_of_the_cards_points(admin: AdminClient) -> None:
    shop = await Shop(admin).make(redeem_points=10, redeem_fen=10)
    card = await shop.card()
    sale = await shop.one(shop.request(Kind.PURCHASE, card, amount=10_000))
    await shop.one(shop.request(Kind.REFUND, card, amount=5_000, rrn=sale.rrn))
    await shop.one(shop.request(Kind.POINTS_REDEEM, card, points=30))
    path = f"/v1/cards/{card['id']}/points/history"
    body = await admin.ok("GET", path)
    assert [(x["reason"], x["points"]) for x in body["items"]] == [
        ("points_redeem", -30),
        ("points_clawback", -50),
        ("points_earn", 100),
    ]
    assert body["items"][0]["account"].startswith("lot:")
    page = await admin.ok("GET", path, limit=2)
    assert len(page["items"]) == 2 and page["next_after"] is not None
    rest = await admin.ok("GET", path, after=page["next_after"])
    assert [x["reason"] for x in rest["items"]] == ["points_earn"]
    outsider = await admin.token("store_crm", "store", "S2")
    status, answer = await admin.call("GET", path, outsider)
    assert (status, answer["error"]["code"]) == (403, "scope_forbidden")


async def test_a_redemption_over_more_lots_than_one_transfer_holds_and_its_reversal(
    admin: AdminClient, db_url: str
) -> None:
    shop = await Shop(admin).make(pending_days=0, redeem_points=1, redeem_fen=1,
                                  expiry={"kind": "rolling_months", "months": 120})  # fmt: skip
    service = admin.app[POINTS_KEY]
    card = await shop.card(balance=400_000)
    day_ms = 86_400_000
    start = 1_768_000_000_000
    for month in range(20):  # twenty lots: one per month-end of expiry
        service.clock_ms = fixed(start + month * 31 * day_ms)
        await shop.one(shop.request(Kind.PURCHASE, card, amount=1_000))
    service.clock_ms = lambda: start + 20 * 31 * day_ms
    before = (await shop.points(card))["lots"]
    assert len(before) == 20
    redeem = shop.request(Kind.POINTS_REDEEM, card, points=195)
    paid = await shop.one(redeem)
    assert (paid.outcome, paid.amount, paid.points_balance) == (Outcome.APPROVED, 195, 5)
    chunks = await sql_rows(db_url, "SELECT key FROM ledger_transfers WHERE reason = "
                            "'points_redeem' AND asset = 'PTS:CLUB' ORDER BY id")  # fmt: skip
    assert len(chunks) == 2
    assert (await shop.one(redeem)).replayed
    assert (await shop.points(card))["usable"] == 5
    await shop.one(shop.request(Kind.REVERSE, None, stan=redeem.stan))
    assert (await shop.points(card))["lots"] == before


async def test_the_journal_verifies_and_every_point_is_accounted_for_after_a_mixed_day(
    admin: AdminClient, db_url: str
) -> None:
    shop = await Shop(admin).make(redeem_points=10, redeem_fen=10)
    card, other = await shop.card(), await shop.card()
    first = shop.request(Kind.PURCHASE, card, amount=20_000)
    sale = await shop.one(first)
    await shop.one(shop.request(Kind.REFUND, card, amount=3_333, rrn=sale.rrn))
    redeem = shop.request(Kind.POINTS_REDEEM, card, points=150)
    await shop.one(redeem)
    await shop.one(shop.request(Kind.VOID, card, amount=20_000, original_batch="000001",
                                original_stan=first.stan))  # fmt: skip
    await shop.one(shop.request(Kind.REVERSE, None, stan=redeem.stan))
    await shop.one(shop.request(Kind.POINTS_EARN, other, amount=7_700))
    await shop.pos.handle([shop.request(Kind.PURCHASE, c, amount=1_000) for c in (card, other)])
    await admin.app[LEDGER_KEY].store.verify(100)  # raises at the first inconsistency
    rows = await sql_rows(db_url, "SELECT purpose, owner_kind, credits_posted - debits_posted "
                          "AS net FROM ledger_accounts WHERE asset = 'PTS:CLUB'")  # fmt: skip
    assert sum(int(r["net"]) for r in rows) == 0
    lots = sum(int(r["net"]) for r in rows if r["purpose"].startswith("lot:"))
    debt = -sum(int(r["net"]) for r in rows if r["purpose"] == "debt")
    views = [await shop.points(c) for c in (card, other)]
    assert lots == sum(v["usable"] + v["pending"] for v in views)
    assert debt == sum(v["debt"] for v in views)
    assert views[1]["balance"] == 77 + 10


async def test_a_members_points_sum_its_live_cards_once(admin: AdminClient) -> None:
    shop = await Shop(admin).make()
    card = await shop.card()
    await shop.one(shop.request(Kind.PURCHASE, card, amount=3_000))
    second = await admin.ok("POST", "/v1/cards", json={"class_code": "PTS", "store": "S1",
                            "member_id": card["member_id"]})  # fmt: skip
    await admin.ok("POST", f"/v1/cards/{second['id']}/topups", json={"amount": 10_000,
                   "tender": "cash", "receipt": "R2", "key": "m2"})  # fmt: skip
    await shop.one(shop.request(Kind.PURCHASE, second, amount=2_000))
    await admin.ok("POST", f"/v1/cards/{card['id']}/replace")  # shares the account: once
    view = await admin.ok("GET", f"/v1/members/{card['member_id']}/points")
    assert view["programs"] == [{"program": "CLUB", "balance": 50, "usable": 50, "pending": 0,
                                 "debt": 0}]  # fmt: skip
    assert sorted(c["balance"] for c in view["cards"]) == [20, 30]
    outsider = await admin.token("store_crm", "store", "S2")
    status, answer = await admin.call("GET", f"/v1/members/{card['member_id']}/points", outsider)
    assert (status, answer["error"]["code"]) == (403, "scope_forbidden")
    status, answer = await admin.call("GET", "/v1/members/999999/points")
    assert (status, answer["error"]["code"]) == (404, "member_not_found")


async def test_a_points_earn_reversed_after_its_points_were_spent_leaves_a_debt(
    admin: AdminClient,
) -> None:
    shop = await Shop(admin).make()
    card = await shop.card()
    earn = shop.request(Kind.POINTS_EARN, card, amount=20_000)
    assert (await shop.one(earn)).points == 200
    await shop.one(shop.request(Kind.POINTS_REDEEM, card, points=100))
    assert (await shop.one(shop.request(Kind.REVERSE, None, stan=earn.stan))).outcome is (
        Outcome.APPROVED
    )
    view = await shop.points(card)
    assert (view["usable"], view["debt"]) == (0, 100)


async def test_many_terminals_spending_one_cards_points_at_once_never_overspend(
    admin: AdminClient, db_url: str
) -> None:
    shop = await Shop(admin).make()
    card = await shop.card()
    await shop.one(shop.request(Kind.PURCHASE, card, amount=50_000))  # 500 points
    asks = [shop.request(Kind.POINTS_REDEEM, card, store, points=100)
            for store in ("S1", "S2") for _ in range(6)]  # fmt: skip
    answers = await asyncio.gather(*(shop.one(a) for a in asks))
    outcomes = sorted(str(a.outcome) for a in answers)
    assert outcomes.count("approved") == 5
    assert outcomes.count("insufficient_funds") == 7
    assert (await shop.points(card))["balance"] == 0
    [funding] = await sql_rows(db_url, "SELECT debits_posted FROM ledger_accounts WHERE "
                               "purpose = 'points_funding'")  # fmt: skip
    assert funding["debits_posted"] == 500


async def test_the_points_redemptions_of_one_call_read_together_each_answered_as_alone(
    admin: AdminClient, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A call's points redemptions read in one turn of the event loop: one read of their
    keys and one of their holdings for all of them. Each gets the answer it gets alone: a
    redemption, one over the card's points, a resend replayed."""
    shop = await Shop(admin).make()
    for store in ("S1", "S2"):
        tid, mid = f"P{next(_tids):07d}", f"M{next(_tids):014d}"
        answer = await admin.ok("POST", "/v1/terminals",
                                json={"tid": tid, "mid": mid, "store": store})  # fmt: skip
        logscan.SCAN.remember("a terminal master key", answer["tmk"])
        shop.tids[store + "b"] = answer["tid"]
    cards = [await shop.card() for _ in range(3)]
    await shop.pos.handle([shop.request(Kind.PURCHASE, c, amount=50_000) for c in cards])
    earlier = shop.request(Kind.POINTS_REDEEM, cards[2], "S2b", points=100)
    assert (await shop.one(earlier)).outcome is Outcome.APPROVED
    # Signed on: their terminals are in the card directory's memory, as at a till.
    await shop.pos.handle([shop.request(Kind.SIGN_ON, None, store) for store in shop.tids])
    reads: list[str] = []
    # A verb running another in the same task (find_unique runs find or find_each) is one read.
    inside: contextvars.ContextVar[bool] = contextvars.ContextVar("inside", default=False)
    for verb in ("find", "find_each", "find_unique"):
        real = getattr(Unit, verb)

        async def counted(self: Unit, table: str, *args: Any, _real: Any = real,
                          _verb: str = verb, **kwargs: Any) -> Any:  # fmt: skip
            if not inside.get():
                asked = len(args[1]) if _verb != "find" else len(args[0].get("key", ()))
                reads.append(f"{_verb} {table} {asked}")
            token = inside.set(True)
            try:
                return await _real(self, table, *args, **kwargs)
            finally:
                inside.reset(token)

        monkeypatch.setattr(Unit, verb, counted)
    spend, over, resend = await shop.pos.handle([
        shop.request(Kind.POINTS_REDEEM, cards[0], "S1", points=300),
        shop.request(Kind.POINTS_REDEEM, cards[1], "S2", points=600),
        earlier,
    ])  # fmt: skip
    assert (spend.outcome, spend.points_balance) == (Outcome.APPROVED, 200)
    assert (over.outcome, over.refusal) == (Outcome.INSUFFICIENT_FUNDS, "points_insufficient")
    assert (resend.outcome, resend.replayed, resend.points) == (Outcome.APPROVED, True, 100)
    # The claims of the one key whose terminal has claimed in its open batch (the resend's;
    # the other two terminals never claimed) in one read (the card directory's); on SQLite the two
    # unclaimed keys checked against the ledger (a read of its transfers and one of its
    # failures; PostgreSQL checks them in the claim's one statement); their six keys in one
    # read; the lots of the two that are not resends in one read; then the resend's
    # balance, read again.
    sqlite = ["find_unique ledger_transfers 2", "find_unique ledger_failures 2"]
    assert reads == [
        "find_unique pos_claims 1",
        *([] if db_url.startswith("postgresql") else sqlite),
        "find ledger_transfers 6",
        "find_each ledger_accounts 2",
        "find_each ledger_accounts 1",
    ], reads
    assert [(await shop.points(c))["balance"] for c in cards] == [200, 500, 400]


# --- a card changed while a points request waited for its lock --------------------------------


def pause_after(
    monkeypatch: pytest.MonkeyPatch, target: object, name: str
) -> tuple[asyncio.Event, asyncio.Event]:
    """Make `target.name`, a method awaited just before a card's lock is taken, stop once
    it returned (`inside` set) until `go_on` is set."""
    real = getattr(target, name)
    inside, go_on = asyncio.Event(), asyncio.Event()

    async def then_wait(*args: Any, **kwargs: Any) -> Any:
        got = await real(*args, **kwargs)
        inside.set()
        await go_on.wait()
        return got

    monkeypatch.setattr(target, name, then_wait)
    return inside, go_on


async def after_change(
    shop: Shop, monkeypatch: pytest.MonkeyPatch, paused: str, request: PosRequest,
    path: str, body: Any = None,
) -> PosResult:  # fmt: skip
    """`request`, held just before it takes its card's lock (after `paused` returned) while
    the admin API's POST `path` changes the card, then let go."""
    inside, go_on = pause_after(monkeypatch, shop.admin.app[POINTS_KEY], paused)
    asked = asyncio.create_task(shop.one(request))
    await asyncio.wait_for(inside.wait(), timeout=5)
    await shop.admin.ok("POST", path, json=body)
    go_on.set()
    return await asyncio.wait_for(asked, timeout=5)


async def test_an_earning_on_a_card_frozen_while_it_waited_for_the_lock_is_declined(
    admin: AdminClient, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A POINTS_EARN read the card active; an officer froze it before the earning took the
    card's lock: under the lock the earning reads it again, `card_frozen`, nothing earned."""
    shop = await Shop(admin).make()
    card = await shop.card()
    request = shop.request(Kind.POINTS_EARN, card, amount=10_000)
    answer = await after_change(shop, monkeypatch, "_program_of_card", request,
                                f"/v1/cards/{card['id']}/freeze")  # fmt: skip
    assert (answer.outcome, answer.points, answer.rrn) == (Outcome.CARD_FROZEN, None, "")
    view = await shop.points(card)
    assert (view["balance"], view["usable"], view["pending"], view["lots"]) == (0, 0, 0, [])
    assert await sql_rows(db_url, "SELECT * FROM points_earnings") == []
    assert await sql_rows(db_url, "SELECT * FROM ledger_transfers WHERE reason = "
                          "'points_earn'") == []  # fmt: skip


async def test_a_redemption_on_a_card_reported_lost_while_it_waited_for_the_lock_is_declined(
    admin: AdminClient, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A POINTS_REDEEM read the card active; it was reported lost before the redemption
    took the card's lock: under the lock it reads it again, `card_lost`, no point spent and
    no money paid to the store."""
    shop, card, _earn = await earned_otherwise(admin)
    request = shop.request(Kind.POINTS_REDEEM, card, points=100)
    answer = await after_change(shop, monkeypatch, "_program_of_card", request,
                                f"/v1/cards/{card['id']}/lost")  # fmt: skip
    assert (answer.outcome, answer.points, answer.amount) == (Outcome.CARD_LOST, None, None)
    view = await shop.points(card)
    assert (view["balance"], view["usable"]) == (100, 100)
    assert await sql_rows(db_url, "SELECT * FROM ledger_transfers WHERE reason = "
                          "'points_redeem'") == []  # fmt: skip


async def test_a_return_on_a_card_closed_while_it_waited_for_the_lock_is_declined(
    admin: AdminClient, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A POINTS_RETURN read the card active; it was closed before the return took the
    card's lock: under the lock it reads it again and is declined `card_closed`, as a
    return on a closed card is at once, with no clawback pinned or posted."""
    shop, card, earn = await earned_otherwise(admin)
    request = shop.request(Kind.POINTS_RETURN, card, amount=10_000, rrn=earn.rrn)
    closing = {"receipt": "C1", "forfeit_points": True}  # its points go with it
    answer = await after_change(shop, monkeypatch, "_program", request,
                                f"/v1/cards/{card['id']}/close", closing)  # fmt: skip
    assert (answer.outcome, answer.points) == (Outcome.CARD_CLOSED, None)
    assert await sql_rows(db_url, "SELECT * FROM points_clawbacks") == []
    assert await sql_rows(db_url, "SELECT * FROM ledger_transfers WHERE reason = "
                          "'points_clawback'") == []  # fmt: skip
    [earning] = await sql_rows(db_url, "SELECT * FROM points_earnings")
    assert (earning["returned"], earning["clawed"]) == (0, 0)
