"""Demo data for `make run`: the demo organization (`cardcore admin demo` makes the same),
a few funded stored-value cards, and a loyalty card with points, coupons and a service
package; and the scripted POS session that shows them (`cardcore pos script` runs it too, in
a process without a database: every card and code it uses is a constant here).

Idempotent: accounts are found by natural key, transfers by idempotency key, and every record
is made through the service the admin API uses (audited as the console), left as it is when
it exists already; so serving the same database twice adds nothing.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, TextIO

from cardcore import limits
from cardcore.cards import admin
from cardcore.cards.accounts import Accounts
from cardcore.cards.directory import Directory
from cardcore.cards.model import mask_pan
from cardcore.cards.pins import Pins
from cardcore.cards.pos import card_token, token_key_of
from cardcore.cards.service import CardService
from cardcore.coupons.service import CouponService
from cardcore.frontend_gateway import security
from cardcore.frontend_gateway.security import KeyMode
from cardcore.frontend_gateway.terminal import PosTerminal, Reply, TerminalError, describe, money
from cardcore.ledger.model import (
    AccountFlags,
    AssetKind,
    CreateAccount,
    CreateAsset,
    CreateTransfer,
    Posting,
    Side,
)
from cardcore.ledger.service import Ledger
from cardcore.org.model import Function, Refused
from cardcore.org.service import CONSOLE, OrgService
from cardcore.points.service import PointsService
from cardcore.records import Records
from cardcore.service_cards.service import ServiceCards
from cardcore.vault import Vault

CLIENT = "demo"

# The demo terminal and cards. The master key is public: it is for the demo only, and
# `cardcore pos` uses it by default so the demo works by hand.
DEMO_TERMINAL = "DEMO0001"
DEMO_MERCHANT = "DEMO00000000001"
DEMO_STORE = "S-A01"
DEMO_ENTITY = "LE-A"
DEMO_TMK = bytes.fromhex("00112233445566778899AABBCCDDEEFF")
DEMO_CARDS = ("6288880000000013", "6288880000000021", "6288880000000039")  # no card class
DEMO_CARD_BALANCE = 50_000  # fen

# The loyalty functions: a card of class DEMO earning in the points program DEMO (1 point a
# yuan; 100 points pay 1.00), an amount-off coupon campaign DEMO with a few imported codes,
# and a package of the service product DEMO-WASH sold onto the card.
DEMO_LOYALTY_CARD = "6288880000000047"
DEMO_CLASS = "DEMO"
DEMO_PROGRAM = "DEMO"
DEMO_CAMPAIGN = "DEMO"
DEMO_COUPONS = ("DEMO-0001", "DEMO-0002", "DEMO-0003", "DEMO-0004", "DEMO-0005")
DEMO_COUPON_FEN = 1_000  # off a bill of at least DEMO_COUPON_MIN_FEN
DEMO_COUPON_MIN_FEN = 5_000
DEMO_PRODUCT = "DEMO-WASH"
DEMO_PRODUCT_USES = 10
CAMPAIGN_DAYS = 3650  # the campaign runs ten years from the first demo load
DAY_MS = 24 * 3600 * 1000

# The demo organization (also `cardcore admin demo`): entities, stores, classes, grants.
DEMO_ENTITIES = {"LE-A": "Demo Retail East Ltd.", "LE-B": "Demo Retail West Ltd."}
DEMO_STORES = (
    ("S-A01", "LE-A", "East flagship", "East", "Shanghai"),
    ("S-A02", "LE-A", "East mall", "East", "Hangzhou"),
    ("S-B01", "LE-B", "West flagship", "West", "Chengdu"),
)
DEMO_CLASSES: tuple[dict[str, Any], ...] = (
    {"code": "ORDINARY", "name": "Ordinary member card", "named": True, "balance_max": 500_000},
    {"code": "VIP", "name": "VIP member card", "named": True, "discount_bp": 500},
    {"code": "BEARER", "name": "Bearer stored-value card", "named": False,
     "balance_max": 100_000, "validity_months": 36},
    {"code": "GIFT100", "name": "Gift card", "named": False, "gift": True,
     "denominations": [10_000, 20_000, 50_000]},
)  # fmt: skip
DEMO_GRANTS = (Function.STORED_VALUE, Function.GIFT)


async def load_organization(org: OrgService, cards: CardService) -> dict[str, list[str]]:
    """Two legal entities, three stores, four card classes and each store's grants; what
    exists already is left as it is. Answers what it made."""
    made: dict[str, list[str]] = {"entities": [], "stores": [], "classes": [], "grants": []}
    for entity, name in DEMO_ENTITIES.items():
        if await _absent(org.create_entity(CONSOLE, entity, name)):
            made["entities"].append(entity)
    for store, entity, name, region, city in DEMO_STORES:
        values = {"id": store, "legal_entity": entity, "name": name, "region": region,
                  "city": city}  # fmt: skip
        if await _absent(org.create_store(CONSOLE, values)):
            made["stores"].append(store)
    for klass in DEMO_CLASSES:
        if await _absent(cards.create_class(CONSOLE, klass)):
            made["classes"].append(klass["code"])
    for store, *_ in DEMO_STORES:
        for function in DEMO_GRANTS:
            if await _grant(org, store, function):
                made["grants"].append(f"{store}:{function.value}")
    return made


async def _grant(org: OrgService, store: str, function: Function, product: str = "") -> bool:
    """Grant `store` the function (for `product`, "" every product) unless an active grant
    of it exists; whether one was made."""
    held = await org.list_grants(CONSOLE, store, None, limits.PAGE_LIMIT_MAX)
    if any(
        g["state"] == "active" and g["function"] == function.value and g["product"] == product
        for g in held
    ):
        return False
    await org.create_grant(CONSOLE, {
        "store": store, "function": function.value, "product": product,
        "budget_count": None, "budget_amount": None, "valid_from": "", "valid_to": "",
    })  # fmt: skip
    return True


async def _absent(change: Awaitable[object]) -> bool:
    """Run a create; False when the object exists already (the demo leaves it)."""
    try:
        await change
    except Refused as exc:
        if exc.code.endswith("_exists"):
            return False
        raise
    return True


async def load(ledger: Ledger) -> dict[str, int]:
    """Create the demo assets and accounts; return account ids by name."""
    results = await ledger.submit(
        [
            CreateAsset("CNY", AssetKind.CURRENCY, 2, "Renminbi (fen)"),
            CreateAsset("PTS", AssetKind.POINTS, 0, "Group points"),
        ]
    )
    wallet = AccountFlags(no_overdraft=True)
    specs = {
        "hq_cash": CreateAccount("CNY", "LE-HQ", "entity", "LE-HQ", "cash"),
        "store_a_sales": CreateAccount("CNY", "LE-A", "store", "S-A01", "sales"),
        "store_b_sales": CreateAccount("CNY", "LE-B", "store", "S-B01", "sales"),
        "card_1_stored_value": CreateAccount(
            "CNY", "LE-A", "card", "C0001", "stored_value", wallet
        ),
        "card_2_stored_value": CreateAccount(
            "CNY", "LE-A", "card", "C0002", "stored_value", wallet
        ),
        "card_3_gift": CreateAccount("CNY", "LE-B", "card", "C0003", "gift", wallet),
        "points_issued": CreateAccount("PTS", "LE-HQ", "program", "PTS", "issued"),
        "card_1_points": CreateAccount("PTS", "LE-A", "card", "C0001", "points", wallet),
    }
    results = await ledger.submit(list(specs.values()))
    ids = {}
    for name, result in zip(specs, results, strict=True):
        if result.account_id is None:
            raise RuntimeError(f"demo account {name} not created: {result.code}")
        ids[name] = result.account_id
    top_ups = [
        ("card_1_stored_value", "hq_cash", "CNY", 50_000),
        ("card_2_stored_value", "hq_cash", "CNY", 20_000),
        ("card_3_gift", "hq_cash", "CNY", 10_000),
        ("card_1_points", "points_issued", "PTS", 1_200),
    ]
    await ledger.submit(
        [
            CreateTransfer(
                client=CLIENT,
                key=f"demo-top-up-{card}",
                asset=asset,
                postings=(
                    Posting(ids[source], Side.DEBIT, amount),
                    Posting(ids[card], Side.CREDIT, amount),
                ),
                reason="demo_top_up",
            )
            for card, source, asset, amount in top_ups
        ]
    )
    return ids


async def load_pos(ledger: Ledger, directory: Directory, kek: bytes) -> dict[str, object]:
    """The demo organization, its terminal, three funded stored-value cards, and the loyalty
    card with its points program, coupon campaign and service package; idempotent."""
    records = Records(ledger.store.engine)
    org, vault, accounts = OrgService(records), Vault(kek), Accounts(ledger)
    pins = Pins(records, vault, directory)
    cards = CardService(records, org, vault, ledger, directory, accounts, pins)
    services = ServiceCards(records, org, ledger, accounts)
    await load_organization(org, cards)
    await _load_loyalty(
        org,
        cards,
        PointsService(records, org, ledger, directory, accounts),
        CouponService(records, org, vault),
        services,
    )
    if await directory.terminal(DEMO_TERMINAL) is None:
        sealed = security.seal(kek, DEMO_TMK, b"tmk:" + DEMO_TERMINAL.encode())
        await admin.add_terminal(
            ledger,
            directory,
            tid=DEMO_TERMINAL,
            mid=DEMO_MERCHANT,
            store=DEMO_STORE,
            legal_entity=DEMO_ENTITY,
            key_mode=str(KeyMode.AES),
            tmk_sealed=sealed.hex(),
        )
    token_key = token_key_of(kek)
    missing = []
    for pan in DEMO_CARDS:
        if await directory.card(card_token(token_key, pan)) is None:
            missing.append(pan)
    if missing:
        await admin.issue_cards(
            ledger,
            directory,
            vault,
            legal_entity=DEMO_ENTITY,
            pans=missing,
            balance=DEMO_CARD_BALANCE,
            balance_max=500_000,
        )
    loyalty = card_token(token_key, DEMO_LOYALTY_CARD)
    if await directory.card(loyalty) is None:
        await admin.issue_cards(
            ledger,
            directory,
            vault,
            legal_entity=DEMO_ENTITY,
            pans=[DEMO_LOYALTY_CARD],
            balance=DEMO_CARD_BALANCE,
            balance_max=500_000,
            class_code=DEMO_CLASS,
            store=DEMO_STORE,
        )
    card = await directory.card(loyalty)
    assert card is not None
    # Sold once: the sale's key makes a repeat answer the first package.
    await services.sell(
        CONSOLE, card.id, product_code=DEMO_PRODUCT, tender="cash", receipt="DEMO",
        key="demo-package", store=DEMO_STORE,
    )  # fmt: skip
    return {
        "terminal": DEMO_TERMINAL,
        "merchant": DEMO_MERCHANT,
        "cards": list(DEMO_CARDS),
        "loyalty_card": DEMO_LOYALTY_CARD,
        "coupons": list(DEMO_COUPONS),
    }


async def _load_loyalty(
    org: OrgService,
    cards: CardService,
    points: PointsService,
    coupons: CouponService,
    services: ServiceCards,
) -> None:
    """The points program DEMO (1 point a yuan, 100 points pay 1.00, usable at once) and the
    card class DEMO earning in it; the coupon campaign DEMO (active, its codes imported); the
    service product DEMO-WASH and the demo store's grant to sell it."""
    program = {"code": DEMO_PROGRAM, "name": "Demo points", "asset": f"PTS:{DEMO_PROGRAM}",
               "pending_days": 0, "redeem_points": 100, "redeem_fen": 100}  # fmt: skip
    await _absent(points.create_program(CONSOLE, program))
    rule = {"code": "BASE", "kind": "base", "points": 1, "per_fen": 100}
    await _absent(points.create_rule(CONSOLE, DEMO_PROGRAM, rule))
    await _absent(cards.create_class(CONSOLE, {
        "code": DEMO_CLASS, "name": "Demo loyalty card", "named": False,
        "balance_max": 500_000, "points_program": DEMO_PROGRAM,
    }))  # fmt: skip
    now_ms = int(time.time() * 1000)
    await _absent(coupons.create_campaign(CONSOLE, {
        "code": DEMO_CAMPAIGN, "name": "Demo 10.00 off 50.00", "kind": "amount_off",
        "legal_entity": DEMO_ENTITY, "value_fen": DEMO_COUPON_FEN,
        "min_spend_fen": DEMO_COUPON_MIN_FEN, "valid_from_ms": now_ms - DAY_MS,
        "valid_to_ms": now_ms + CAMPAIGN_DAYS * DAY_MS,
    }))  # fmt: skip
    if (await coupons.get_campaign(CONSOLE, DEMO_CAMPAIGN))["state"] == "draft":
        await coupons.update_campaign(CONSOLE, DEMO_CAMPAIGN, {"state": "active"})
    # Imported once: the key makes a repeat answer the first batch.
    await coupons.import_codes(CONSOLE, DEMO_CAMPAIGN, list(DEMO_COUPONS), key="demo-codes")
    await _absent(services.create_product(CONSOLE, {
        "code": DEMO_PRODUCT, "name": "Car wash, 10 times", "legal_entity": DEMO_ENTITY,
        "uses": DEMO_PRODUCT_USES, "price_fen": 20_000, "validity_months": 120,
        "stores": [DEMO_STORE],
    }))  # fmt: skip
    await _grant(org, DEMO_STORE, Function.SERVICE, DEMO_PRODUCT)


# --- the scripted session ----------------------------------------------------------------------

COUPON_QUERY, COUPON_REDEEM = "920000", "930000"  # processing codes (card-protocol.md)
COUPON_BILL = 8_800  # fen: a bill the demo coupon takes 10.00 off


async def pos_session(host: str, port: int, out: TextIO) -> bool:
    """A short scripted POS session against the demo data, printed for a person to read.
    Whatever it takes it gives back (the coupon, the service use, the loyalty card's money),
    and it earns more points than it spends: it runs the same on every start. False when it
    stopped half way (no gateway, a broken line): `cardcore pos script` exits 1 then."""
    terminal = PosTerminal(host, port, DEMO_TERMINAL, DEMO_MERCHANT, DEMO_TMK, KeyMode.AES)
    card = DEMO_CARDS[0]

    def show(what: str, text: str) -> None:
        out.write(f"POS {DEMO_TERMINAL} {what:<34} {text}\n")
        out.flush()

    try:
        show("sign on", describe(await terminal.sign_on()))
        # A batch of its own: whatever was left open (requests by hand, say) is closed
        # first, or the session's STANs would meet theirs (94).
        await _settle(terminal, show, "close the batch found open")
        show(f"balance {mask_pan(card)}", describe(await terminal.inquiry(card)))
        bought = await terminal.purchase(card, 2_350)
        show("purchase 23.50", describe(bought))
        show("purchase 18.00", describe(await terminal.purchase(card, 1_800)))
        if bought.code == "00":
            show(
                "void of the 23.50", describe(await terminal.void(card, 2_350, bought.fields["11"]))
            )
        await _loyalty_session(terminal, show)
        await _settle(terminal, show, "settlement")
    except (TerminalError, OSError) as exc:
        show("session stopped", str(exc))
        return False
    finally:
        await terminal.close()
        _by_hand(out)
    return True


async def _settle(terminal: PosTerminal, show: Callable[[str, str], None], what: str) -> None:
    """Settle the terminal's batch; when the host's totals differ (requests this terminal
    object did not send), the batch upload closes it anyway."""
    settled = await terminal.settle()
    show(what, describe(settled))
    if settled.code == "00" and settled.fields["48"][30] != "1":
        show("batch upload", describe((await terminal.upload())[-1]))


async def _loyalty_session(terminal: PosTerminal, show: Callable[[str, str], None]) -> None:
    """The loyalty card: a purchase that earns points, points as payment, a coupon off a
    bill, a service use; then the coupon and the use given back and the money topped up."""
    card = DEMO_LOYALTY_CARD
    spent = 0

    async def buy(what: str, amount: int) -> None:
        nonlocal spent
        reply = await terminal.purchase(card, amount)
        show(what, describe(reply))
        spent += amount if reply.code == "00" else 0

    await buy(f"purchase 128.00 {mask_pan(card)}", 12_800)
    show("points redeem 100", describe(await terminal.points_redeem(card, 100)))
    code, query = "", None
    for code in DEMO_COUPONS:  # the first code free (each run gives its code back)
        query = await terminal.coupon(COUPON_QUERY, code, COUPON_BILL, card)
        if query.code == "00":
            break
    if query is not None:
        show(f"coupon query {code} on {money(COUPON_BILL)}", describe(query))
    redeemed: Reply | None = None
    if query is not None and query.code == "00":
        redeemed = await terminal.coupon(COUPON_REDEEM, code, COUPON_BILL, card)
        show(f"coupon redeem {code}", describe(redeemed))
    if redeemed is not None and redeemed.code == "00":
        due = COUPON_BILL - (redeemed.discount or 0)
        await buy(f"purchase {money(due)} ({money(COUPON_BILL)} less it)", due)
    used = await terminal.service_redeem(card, 1, DEMO_PRODUCT)
    show(f"service {DEMO_PRODUCT}, 1 use", describe(used))
    if used.code == "00":
        show("reversal of the service use", describe(await terminal.reverse()))
    if redeemed is not None and redeemed.code == "00":
        back = await terminal.coupon_reverse(redeemed.fields["11"], code)
        show(f"coupon {code} given back", describe(back))
    if spent:
        held = await terminal.topup(card, spent)
        show(f"top-up {money(spent)} (cash)", describe(held))
        if held.code == "00":
            confirm = await terminal.topup_confirm(held.fields["11"], spent)
            show("top-up confirmed", describe(confirm))


def _by_hand(out: TextIO) -> None:
    """What a person can try with `cardcore pos` (the numbers in full: README.md, and the
    "demo_pos" of the server's listening line)."""
    loyalty, coupons = mask_pan(DEMO_LOYALTY_CARD), f"{DEMO_COUPONS[0]}..{DEMO_COUPONS[-1][-4:]}"
    out.write(
        "By hand (.venv/bin/cardcore pos ACTION; the demo terminal is the default):\n"
        f"  stored value  {', '.join(mask_pan(c) for c in DEMO_CARDS)}: inquiry, purchase, "
        "void, refund, reverse, settle\n"
        f"  loyalty card  {loyalty} (class {DEMO_CLASS}, points program {DEMO_PROGRAM}): "
        "purchase, points-earn, points-redeem --points 100, "
        f"service-redeem --product {DEMO_PRODUCT}\n"
        f"  coupons       {coupons} ({money(DEMO_COUPON_FEN)} off "
        f"{money(DEMO_COUPON_MIN_FEN)}): coupon-query, coupon-redeem, coupon-reverse\n"
    )
    out.flush()
