"""Issue 5's POS messages end to end over the card protocol: a real `cardcore serve` (ledger,
host and gateway), the reference terminal over TCP, on SQLite and PostgreSQL, everything set
up through the admin API (/v1) as HQ and a store would.

Points earned with a purchase and with a cash purchase (900000), points as payment
(910000) and its reversal, the return of goods of a cash purchase (980000) and its
reversal, coupon query, reserve, redeem, a second terminal's redeem of the
used coupon, coupon reverse (920000..950000), service redemption (960000) and its reversal,
manager authorization (970000) approved and declined. The module's last test stops the
servers and runs `cardcore ledger verify` on each database.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from cardcore.db import make_engine
from cardcore.frontend_gateway import codec
from cardcore.frontend_gateway.security import KeyMode
from cardcore.org.service import OrgService
from cardcore.records import Records
from tests.e2e.pos_support import (
    CardcoreServer,
    CertTerminal,
    Kit,
    Registered,
    reversal_of,
    server_fixtures,
)
from tests.helpers import run_cardcore

pytestmark = pytest.mark.timeout(180)

ENTITY, STORE = "LE-LOYAL", "SL1"
PIN = "246810"


# --- servers -----------------------------------------------------------------------------------


sqlite_server, postgresql_server, server, kit = server_fixtures("pos-loyalty")


@dataclass
class Admin:
    """The admin API of the server, as an HQ admin (a token minted as `cardcore admin token`
    mints the first one)."""

    url: str
    session: aiohttp.ClientSession

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        async with self.session.request(method, self.url + path, json=body) as response:
            return response.status, await response.json()

    async def ok(self, method: str, path: str, body: Any = None) -> Any:
        status, answer = await self.call(method, path, body)
        assert status in (200, 201), (method, path, status, answer)
        return answer


async def _token(db_url: str) -> str:
    engine = make_engine(db_url, pool_size=1)
    try:
        minted = await OrgService(Records(engine)).bootstrap_admin("e2e-loyalty", 3600)
    finally:
        await engine.dispose()
    return str(minted["token"])


@pytest.fixture
async def admin(server: CardcoreServer) -> AsyncIterator[Admin]:
    token = await _token(server.db_url)
    server.vault["admin token"] = token
    headers = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession(headers=headers) as session:
        yield Admin(server.url, session)


# --- the world ------------------------------------------------------------------------------------


@dataclass
class World:
    card: dict[str, Any]  # a member's named card of STORE, topped up
    terminal: CertTerminal  # an AES terminal of STORE, signed on
    other: CertTerminal  # a second terminal of STORE, signed on
    run: str  # this test's suffix for unique codes


async def _org(admin: Admin) -> None:
    status, answer = await admin.call("POST", "/v1/legal-entities", {"id": ENTITY, "name": ENTITY})
    assert status in (201, 409), answer
    status, answer = await admin.call(
        "POST",
        "/v1/stores",
        {
            "id": STORE,
            "legal_entity": ENTITY,
            "name": "Loyal One",
            "region": "East",
            "city": "Hangzhou",
        },
    )
    assert status in (201, 409), answer


async def _terminal(admin: Admin, kit: Kit, mode: KeyMode = KeyMode.AES) -> CertTerminal:
    tid = "L" + secrets.token_hex(4)[:7].upper()
    mid = f"M{tid}000000"
    answer = await admin.ok(
        "POST", "/v1/terminals", {"tid": tid, "mid": mid, "store": STORE, "key_mode": str(mode)}
    )
    kit.server.vault[f"tmk {tid}"] = answer["tmk"]
    term = kit.terminal_for(Registered(tid, mid, mode, bytes.fromhex(answer["tmk"]), answer["kcv"]))
    assert (await term.sign_on()).code == "00"
    return term


async def _world(admin: Admin, kit: Kit, *, card_class: str) -> World:
    run = secrets.token_hex(3).upper()
    await _org(admin)
    for function in ("stored_value", "service", "coupon", "points", "manager"):
        await admin.ok("POST", "/v1/grants", {"store": STORE, "function": function})
    member = await admin.ok(
        "POST",
        "/v1/members",
        {"mobile": f"136{secrets.randbelow(10**8):08d}", "name": "Lin Yue", "home_store": STORE},
    )
    card = await admin.ok(
        "POST", "/v1/cards", {"class_code": card_class, "store": STORE, "member_id": member["id"]}
    )
    kit.server.vault[f"card {card['id']}"] = card["pan"]
    await admin.ok(
        "POST",
        f"/v1/cards/{card['id']}/topups",
        {"amount": 100_000, "tender": "cash", "receipt": "E2E", "key": f"t-{run}"},
    )
    terminal = await _terminal(admin, kit)
    other = await _terminal(admin, kit, KeyMode.TDES)
    return World(card, terminal, other, run)


async def _plain_class(admin: Admin, run: str) -> str:
    code = f"PLAIN{run}"
    await admin.ok("POST", "/v1/card-classes", {"code": code, "name": "Plain", "named": True})
    return code


# --- points ------------------------------------------------------------------------------------


async def test_points_earned_with_purchases_redeemed_as_payment_and_taken_back(
    admin: Admin, kit: Kit
) -> None:
    run = secrets.token_hex(3).upper()
    program = f"CLUB{run}"
    await admin.ok("POST", "/v1/points/programs", {"code": program, "name": "Club points",
                   "asset": f"PTS:{run}", "redeem_points": 100, "redeem_fen": 100})  # fmt: skip
    await admin.ok("POST", f"/v1/points/programs/{program}/rules",
                   {"code": "BASE", "kind": "base", "points": 1, "per_fen": 100})  # fmt: skip
    card_class = f"CLUB{run}"
    await admin.ok("POST", "/v1/card-classes", {"code": card_class, "name": "Club",
                   "named": True, "points_program": program})  # fmt: skip
    w = await _world(admin, kit, card_class=card_class)
    pan, term = w.card["pan"], w.terminal

    sale = await term.purchase(pan, 2_350)  # 23.50 CNY earns 23 points, rounded down
    assert (sale.code, sale.points, sale.points_balance) == ("00", 23, 23), sale.fields
    cash = await w.other.points_earn(pan, 10_000, [("FOOD", 6_000), ("TOYS", 4_000)])
    assert (cash.code, cash.points, cash.points_balance) == ("00", 100, 123)
    money_before = await kit.available(w.card["account_id"])

    paid = await term.points_redeem(pan, 100)
    assert (paid.code, paid.approved_amount, paid.points, paid.points_balance) == (
        "00", 100, 100, 23)  # fmt: skip
    assert await kit.available(w.card["account_id"]) == money_before  # paid by the points
    # The terminal never saw that reply: its reversal puts the points back into their lots.
    assert (await term.send(reversal_of(_last_request(term)))).code == "00"
    view = await admin.ok("GET", f"/v1/cards/{w.card['id']}/points")
    assert view["balance"] == 123, view

    void = await term.void(pan, 2_350, sale.fields["11"])
    assert (void.code, void.points, void.points_balance) == ("00", -23, 100), void.fields
    assert (await term.points_redeem(pan, 150)).refusal == "redeem_not_whole_blocks"
    too_many = await term.points_redeem(pan, 200)
    assert (too_many.code, too_many.refusal) == ("51", "points_insufficient")
    view = await admin.ok("GET", f"/v1/cards/{w.card['id']}/points")
    assert (view["balance"], view["usable"]) == (100, 100), view


async def test_a_cash_purchase_returned_takes_back_its_points_share_over_the_wire(
    admin: Admin, kit: Kit
) -> None:
    """980000 names the 900000 by the F37 of its reply: the returned part's share of its
    points goes back (PT below zero, PB after), every reply MAC'd under the session key;
    a 0400 of the return puts the points back; more than the 900000's amount is 61."""
    run = secrets.token_hex(3).upper()
    program = f"BACK{run}"
    await admin.ok("POST", "/v1/points/programs", {"code": program, "name": "Club points",
                   "asset": f"PTS:B{run}", "redeem_points": 100, "redeem_fen": 100})  # fmt: skip
    await admin.ok("POST", f"/v1/points/programs/{program}/rules",
                   {"code": "BASE", "kind": "base", "points": 1, "per_fen": 100})  # fmt: skip
    card_class = f"BACK{run}"
    await admin.ok("POST", "/v1/card-classes", {"code": card_class, "name": "Club",
                   "named": True, "points_program": program})  # fmt: skip
    w = await _world(admin, kit, card_class=card_class)
    pan, term = w.card["pan"], w.terminal
    cash = await w.other.points_earn(pan, 10_000)
    assert (cash.code, cash.points, cash.points_balance) == ("00", 100, 100)
    money = await kit.available(w.card["account_id"])
    checked = term.replies_checked

    back = await term.points_return(pan, 2_550, cash.fields["37"])
    assert (back.code, back.points, back.points_balance) == ("00", -25, 75), back.fields
    assert "64" in back.fields and back.fields["37"] != cash.fields["37"]
    assert term.replies_checked == checked + 1  # its MAC verified under the session MAK
    # The terminal never saw that reply: its reversal puts the 25 points back.
    assert (await term.send(reversal_of(_last_request(term)))).code == "00"
    view = await admin.ok("GET", f"/v1/cards/{w.card['id']}/points")
    assert view["balance"] == 100, view

    whole = await w.other.points_return(pan, 10_000, cash.fields["37"])
    assert (whole.code, whole.points, whole.points_balance) == ("00", -100, 0)
    over = await term.points_return(pan, 1, cash.fields["37"])
    assert (over.code, over.refusal) == ("61", "return_exceeds_original")
    assert await kit.available(w.card["account_id"]) == money  # no money moved


# --- service cards ------------------------------------------------------------------------------


async def test_service_redemption_and_its_reversal(admin: Admin, kit: Kit) -> None:
    run = secrets.token_hex(3).upper()
    w = await _world(admin, kit, card_class=await _plain_class(admin, run))
    product = f"WASH{run}"
    await admin.ok(
        "POST",
        "/v1/service-products",
        {
            "code": product,
            "name": "Car wash x10",
            "legal_entity": ENTITY,
            "uses": 10,
            "price_fen": 30_000,
            "validity_months": 12,
        },
    )
    sold = await admin.ok(
        "POST",
        f"/v1/cards/{w.card['id']}/service-packages",
        {"product": product, "tender": "cash", "receipt": "S1", "key": f"sale-{run}"},
    )
    assert sold["uses_left"] == 10

    pan, term = w.card["pan"], w.terminal
    used = await term.service_redeem(pan, 1, product)
    assert (used.code, used.uses_left) == ("00", 9), used.fields
    two = await term.service_redeem(pan, 2)  # the host picks the package
    assert (two.code, two.uses_left) == ("00", 7)
    # The terminal reverses the last one (no reply seen): the two uses come back, once.
    reversal = reversal_of(_last_request(term))
    assert (await term.send(reversal)).code == "00"
    assert (await term.send(reversal)).code == "00"
    again = await term.service_redeem(pan, 1, product)
    assert (again.code, again.uses_left) == ("00", 8)
    none = await term.service_redeem(pan, 1, f"NONE{run}")
    assert (none.code, none.refusal) == ("57", "service_no_package")
    too_many = await term.service_redeem(pan, 9, product)
    assert too_many.code == "51"
    listed = await admin.ok("GET", f"/v1/cards/{w.card['id']}/service-packages")
    assert [p["uses_left"] for p in listed["items"]] == [8]


# --- manager cards --------------------------------------------------------------------------------


async def test_manager_authorization_approved_and_declined(admin: Admin, kit: Kit) -> None:
    run = secrets.token_hex(3).upper()
    w = await _world(admin, kit, card_class=await _plain_class(admin, run))
    user = await admin.ok(
        "POST",
        "/v1/users",
        {
            "name": f"mgr{run.lower()}",
            "role": "store_supervisor",
            "scope_kind": "store",
            "scope_id": STORE,
        },
    )
    card = await admin.ok(
        "POST",
        "/v1/manager-cards",
        {
            "staff_user_id": user["id"],
            "store": STORE,
            "max_percent_bp": 1_000,
            "daily_total_fen": 5_000,
            "reasons": ["price_match", "damaged"],
        },
    )
    kit.server.vault[f"manager card {card['id']}"] = card["pan"]
    await admin.ok("POST", f"/v1/manager-cards/{card['id']}/pin", {"pin": PIN})
    kit.server.vault["manager pin"] = PIN
    pan, term = card["pan"], w.terminal

    approved = await term.manager_auth(pan, PIN, 30_000, 1_500, "price_match")
    assert (approved.code, approved.discount) == ("00", 1_500), approved.fields
    over = await term.manager_auth(pan, PIN, 30_000, 3_001, "price_match")
    assert (over.code, over.refusal) == ("61", "manager_over_percent")
    reason = await w.other.manager_auth(pan, PIN, 30_000, 1_000, "birthday")
    assert (reason.code, reason.refusal) == ("57", "manager_reason_unknown")
    wrong = await term.manager_auth(pan, "999999", 30_000, 1_000, "damaged")
    assert wrong.code == "55"
    cashier = await term.manager_auth(w.card["pan"], PIN, 30_000, 1_000, "damaged")
    assert (cashier.code, cashier.refusal) == ("57", "manager_not_manager")
    # The day's total: 1,500 used of 5,000; 3,000 more fits, then 600 does not.
    assert (await w.other.manager_auth(pan, PIN, 30_000, 3_000, "damaged")).code == "00"
    daily = await term.manager_auth(pan, PIN, 30_000, 600, "damaged")
    assert (daily.code, daily.refusal) == ("61", "manager_over_daily")
    # A reversal of an approval frees its part of the day's total.
    first = await term.manager_auth(pan, PIN, 10_000, 400, "damaged")
    assert first.code == "00"
    assert (await term.send(reversal_of(_last_request(term)))).code == "00"
    assert (await term.manager_auth(pan, PIN, 10_000, 500, "damaged")).code == "00"
    uses = await admin.ok("GET", f"/v1/manager-cards/{card['id']}/authorizations")
    assert len(uses["items"]) == 8  # every use, approved or not, for the audit


# --- coupons -----------------------------------------------------------------------------------


async def test_coupon_query_reserve_redeem_used_elsewhere_reverse_and_redeem_again(
    admin: Admin, kit: Kit
) -> None:
    run = secrets.token_hex(3).upper()
    w = await _world(admin, kit, card_class=await _plain_class(admin, run))
    campaign = f"SPR{run}"
    now_ms = int(time.time() * 1000)
    await admin.ok(
        "POST",
        "/v1/coupon-campaigns",
        {
            "code": campaign,
            "name": "Spring 20 off 50",
            "kind": "amount_off",
            "legal_entity": ENTITY,
            "value_fen": 2_000,
            "min_spend_fen": 5_000,
            "valid_from_ms": now_ms - 3_600_000,
            "valid_to_ms": now_ms + 86_400_000,
        },
    )
    await admin.ok("PATCH", f"/v1/coupon-campaigns/{campaign}", {"state": "active"})
    made = await admin.ok("POST", f"/v1/coupon-campaigns/{campaign}/codes", {"count": 2})
    code, spare = made["codes"]
    typed = code.lower().replace("1", "l")  # as a cashier may type it: forgiven
    pan, term, other = w.card["pan"], w.terminal, w.other
    basket = [("FOOD", 12_000)]

    query = await term.coupon("920000", typed, 12_000, pan, basket)
    assert (query.code, query.discount, query.tlv["CC"]) == ("00", 2_000, campaign), query.fields
    reserve = await term.coupon("950000", code, 12_000, pan, basket)
    assert (reserve.code, reserve.discount) == ("00", 2_000)
    held = await other.coupon("930000", code, 12_000)
    assert (held.code, held.refusal) == ("C2", "coupon_reserved")
    redeem = await term.coupon("930000", code, 12_000, pan, basket)
    assert (redeem.code, redeem.discount) == ("00", 2_000)
    used = await other.coupon("930000", code, 12_000)
    assert used.code == "C2"
    # The customer returns the goods: the redemption is undone, the coupon usable again once.
    undone = await term.coupon_reverse(redeem.fields["11"], code)
    assert undone.code == "00"
    assert (await term.coupon_reverse(redeem.fields["11"], code)).code == "00"  # harmless
    again = await other.coupon("930000", code, 9_000)
    assert (again.code, again.discount) == ("00", 2_000)
    # A 0400 of the other terminal's redemption gives the coupon back too.
    assert (await other.send(reversal_of(_last_request(other)))).code == "00"
    assert (await term.coupon("920000", code, 12_000)).code == "00"

    assert (await term.coupon("920000", "0000-0000-0000-0000", 12_000)).code == "C1"
    small = await term.coupon("920000", spare, 4_000)
    assert (small.code, small.refusal) == ("57", "coupon_min_spend")
    figures = await admin.ok("GET", f"/v1/coupon-campaigns/{campaign}/figures")
    assert figures["redeemed"] == 0, figures  # redeemed twice, both undone


# --- the ledger ---------------------------------------------------------------------------------


async def test_zz_the_ledger_verifies(server: CardcoreServer) -> None:
    """Last in the module: stops the server and verifies its journal (points, coupons and
    service sales included)."""
    assert await asyncio.to_thread(server.stop) == 0
    done = await asyncio.to_thread(
        run_cardcore, "ledger", "verify", "--db", server.db_url, cwd=server.workdir
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert '"status": "ok"' in done.stdout, done.stdout


def _last_request(term: CertTerminal) -> dict[str, str]:
    """The fields of the terminal's last request (to build its reversal by hand)."""
    frame = codec.split_frame(term.last_sent[codec.LENGTH_BYTES :])
    return codec.decode(frame.body)
