"""Demo data for `make run`: two legal entities, a store each, a few funded member cards.

Idempotent: accounts are found by natural key and transfers by idempotency key, so serving
the same database twice adds nothing.
"""

from __future__ import annotations

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

CLIENT = "demo"


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
