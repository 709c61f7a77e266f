"""Demo data for `make run`: two legal entities, a store each, a few funded member cards.

Idempotent: accounts are found by natural key and transfers by idempotency key, so serving
the same database twice adds nothing.
"""

from __future__ import annotations

from typing import TextIO

from cardcore.cards import admin
from cardcore.cards.directory import Directory
from cardcore.cards.model import mask_pan
from cardcore.cards.pos import card_token, token_key_of
from cardcore.frontend_gateway import security
from cardcore.frontend_gateway.security import KeyMode
from cardcore.frontend_gateway.terminal import PosTerminal, TerminalError, describe
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
from cardcore.vault import Vault

CLIENT = "demo"

# The demo terminal and cards. The master key is public: it is for the demo only, and
# `cardcore pos` uses it by default so the demo works by hand.
DEMO_TERMINAL = "DEMO0001"
DEMO_MERCHANT = "DEMO00000000001"
DEMO_STORE = "S-A01"
DEMO_ENTITY = "LE-A"
DEMO_TMK = bytes.fromhex("00112233445566778899AABBCCDDEEFF")
DEMO_CARDS = ("6288880000000013", "6288880000000021", "6288880000000039")
DEMO_CARD_BALANCE = 50_000  # fen


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
    """The demo terminal and three funded stored-value cards; idempotent."""
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
            Vault(kek),
            legal_entity=DEMO_ENTITY,
            pans=missing,
            balance=DEMO_CARD_BALANCE,
            balance_max=500_000,
        )
    return {"terminal": DEMO_TERMINAL, "merchant": DEMO_MERCHANT, "cards": list(DEMO_CARDS)}


async def pos_session(host: str, port: int, out: TextIO) -> None:
    """A short scripted POS session against the demo data, printed for a person to read."""
    terminal = PosTerminal(host, port, DEMO_TERMINAL, DEMO_MERCHANT, DEMO_TMK, KeyMode.AES)
    card = DEMO_CARDS[0]

    def show(what: str, text: str) -> None:
        out.write(f"POS {DEMO_TERMINAL} {what:<28} {text}\n")
        out.flush()

    try:
        show("sign on", describe(await terminal.sign_on()))
        show(f"balance {mask_pan(card)}", describe(await terminal.inquiry(card)))
        bought = await terminal.purchase(card, 2_350)
        show("purchase 23.50", describe(bought))
        show("purchase 18.00", describe(await terminal.purchase(card, 1_800)))
        if bought.code == "00":
            show(
                "void of the 23.50", describe(await terminal.void(card, 2_350, bought.fields["11"]))
            )
        show("settlement", describe(await terminal.settle()))
    except (TerminalError, OSError) as exc:
        show("session stopped", str(exc))
    finally:
        await terminal.close()
