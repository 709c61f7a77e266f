"""Registering terminals and issuing stored-value cards: the host's bootstrap use cases
(the CLI, the demo data and the benchmark call them; issue 4 adds the admin API, members
and card classes on top).

Every account is made through the ledger (idempotent by natural key), every opening balance
is a ledger transfer; the card and terminal records only point at those accounts.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass

from cardcore import limits
from cardcore.cards.directory import Directory
from cardcore.cards.model import (
    CURRENCY,
    POS_CLIENT,
    Card,
    Terminal,
    is_terminal_id,
    luhn_digit,
    mask_pan,
)
from cardcore.ledger.model import (
    AccountFlags,
    AssetKind,
    CreateAccount,
    CreateAsset,
    CreateTransfer,
    Op,
    Posting,
    Result,
    Side,
)
from cardcore.ledger.service import Ledger
from cardcore.vault import Vault

CARD_PREFIX = "628888"  # the group's card-number prefix (IIN)
CARD_DIGITS = 19  # 12 random digits: 100,000 new cards collide with odds of about 1 in 200
SECRET_BYTES = 16  # a card's media secret (magnetic stripe, QR, chip): random, never derived


class AdminError(ValueError):
    """A bootstrap request that cannot be done; nothing was changed."""


async def _submit(ledger: Ledger, ops: Sequence[Op]) -> list[Result]:
    results: list[Result] = []
    for i in range(0, len(ops), limits.REQUEST_OPS_MAX):
        chunk = await ledger.submit(ops[i : i + limits.REQUEST_OPS_MAX])
        for result in chunk:
            if not result.ok:
                raise AdminError(f"ledger refused: {result.code}")
        results.extend(chunk)
    return results


async def ensure_currency(ledger: Ledger) -> None:
    await _submit(ledger, [CreateAsset(CURRENCY, AssetKind.CURRENCY, 2, "Renminbi (fen)")])


async def add_terminal(
    ledger: Ledger,
    directory: Directory,
    *,
    tid: str,
    mid: str,
    store: str,
    legal_entity: str,
    key_mode: str,
    tmk_sealed: str,
) -> Terminal:
    """Register a terminal of `store` with its sealed master key; batch 000001."""
    if not is_terminal_id(tid):
        raise AdminError("terminal id is eight letters or digits")
    if len(mid) != 15 or not mid.isalnum() or not mid.isascii():
        raise AdminError("merchant id is fifteen letters or digits")
    if await directory.terminal(tid) is not None:
        raise AdminError(f"terminal {tid} exists")
    await ensure_currency(ledger)
    sales, cash = await _submit(
        ledger,
        [
            CreateAccount(CURRENCY, legal_entity, "store", store, "sales"),
            CreateAccount(CURRENCY, legal_entity, "store", store, "cash"),
        ],
    )
    assert sales.account_id is not None
    assert cash.account_id is not None
    terminal = Terminal(
        tid=tid,
        mid=mid,
        store=store,
        legal_entity=legal_entity,
        key_mode=key_mode,
        tmk_sealed=tmk_sealed,
        state="active",
        batch="000001",
        batch_cycle=0,
        sales_account=sales.account_id,
        cash_account=cash.account_id,
    )
    await directory.add_terminal(terminal, _now_ms())
    return terminal


@dataclass(frozen=True, slots=True)
class Issued:
    pan: str  # shown once, to the caller that issued the card
    account_id: int


def new_pan() -> str:
    body = CARD_PREFIX + "".join(
        secrets.choice("0123456789") for _ in range(CARD_DIGITS - len(CARD_PREFIX) - 1)
    )
    return body + luhn_digit(body)


def sealed_columns(vault: Vault, token: str, pan: str) -> dict[str, str]:
    """A card's number and a new random media secret, each sealed to this card's token: the
    number is never stored in clear, and the secret cannot be derived from it."""
    secret = secrets.token_bytes(SECRET_BYTES).hex()
    return {
        "pan_sealed": vault.seal_text(f"pan:{token}", pan),
        "secret_sealed": vault.seal_text(f"secret:{token}", secret),
    }


async def issue_cards(
    ledger: Ledger,
    directory: Directory,
    vault: Vault,
    *,
    legal_entity: str,
    count: int = 0,
    pans: Sequence[str] = (),
    balance: int = 0,
    balance_max: int = 0,
    expires: str = "",
    class_code: str = "",
    store: str = "",
) -> list[Issued]:
    """Issue `count` new cards (or the given `pans`), each with its stored-value account
    and, when `balance` is set, an opening top-up from the entity's card float; of the card
    class `class_code` ("" none: such a card earns no points) issued in `store` ("" none)."""
    if not 0 <= count <= limits.CARD_ISSUE_BATCH_MAX:
        raise AdminError(f"count must be 0..{limits.CARD_ISSUE_BATCH_MAX}")
    wanted = list(dict.fromkeys(pans))
    known, target = set(wanted), len(wanted) + count
    while len(wanted) < target:  # new numbers, never one drawn twice
        pan = new_pan()
        if pan not in known:
            known.add(pan)
            wanted.append(pan)
    if not wanted:
        raise AdminError("nothing to issue")
    await ensure_currency(ledger)
    tokens = [vault.card_token(pan) for pan in wanted]
    taken = await directory.existing_tokens(tokens)
    if taken:
        pan = next(p for p, t in zip(wanted, tokens, strict=True) if t in taken)
        raise AdminError(f"card {mask_pan(pan)} exists")
    float_account = (
        await _submit(
            ledger, [CreateAccount(CURRENCY, legal_entity, "entity", legal_entity, "card_float")]
        )
    )[0].account_id
    assert float_account is not None
    wallet = AccountFlags(no_overdraft=True)
    accounts = await _submit(
        ledger,
        [
            CreateAccount(CURRENCY, legal_entity, "card", token[:32], "stored_value", wallet)
            for token in tokens
        ],
    )
    ids = [r.account_id for r in accounts]
    cards = [
        Card(
            token=token,
            pan_masked=mask_pan(pan),
            legal_entity=legal_entity,
            account_id=account_id,
            expires=expires,
            state="active",
            balance_max=balance_max,
            class_code=class_code,
            store=store,
        )
        for pan, token, account_id in zip(wanted, tokens, ids, strict=True)
        if account_id is not None
    ]
    extra = [sealed_columns(vault, c.token, pan) for c, pan in zip(cards, wanted, strict=True)]
    cards = await directory.add_cards(cards, _now_ms(), extra)
    if balance > 0:
        await _submit(
            ledger,
            [
                CreateTransfer(
                    client=POS_CLIENT,
                    key=f"issue/{card.token[:48]}",
                    asset=CURRENCY,
                    postings=(
                        Posting(float_account, Side.DEBIT, balance),
                        Posting(card.account_id, Side.CREDIT, balance),
                    ),
                    reason="opening_balance",
                )
                for card in cards
            ],
        )
    return [Issued(pan, card.account_id) for pan, card in zip(wanted, cards, strict=True)]


def _now_ms() -> int:
    return int(time.time() * 1000)
