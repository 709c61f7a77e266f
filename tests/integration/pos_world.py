"""A POS host in memory on a real database, for tests/integration/test_pos_cards.py: the
ledger, the card directory, `PosService` with its PIN reader, accounts and PIN checks, and
builders for terminals, card classes, members and cards (with a PIN, a class, a member, in a
legal entity) that write what the admin services would write, without going through them.

Card numbers, PINs and PIN blocks made here are registered with the whole run's log scan.
"""

from __future__ import annotations

import itertools
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from cardcore.cards.accounts import Accounts
from cardcore.cards.directory import Directory
from cardcore.cards.model import (
    CURRENCY,
    Card,
    Kind,
    PosRequest,
    PosResult,
    Terminal,
    luhn_digit,
    mask_pan,
    transaction_key,
)
from cardcore.cards.pins import Pins
from cardcore.cards.pos import PosService
from cardcore.frontend_gateway import security
from cardcore.ledger.model import (
    Account,
    AccountFlags,
    AssetKind,
    CreateAccount,
    CreateAsset,
    CreateTransfer,
    Posting,
    Side,
)
from cardcore.ledger.service import Ledger
from cardcore.records import Records
from cardcore.vault import Vault
from tests import logscan

KEK = bytes(range(32, 64))
STORE_OF = {"LE-A": "S-A01", "LE-B": "S-B01"}
_tids = itertools.count(1)
_stans = itertools.count(1)


def new_pan() -> str:
    body = "628888" + "".join(secrets.choice("0123456789") for _ in range(12))
    pan = body + luhn_digit(body)
    logscan.SCAN.remember("a test card number", pan)
    return pan


@dataclass
class Issued:
    pan: str = field(repr=False)
    card: Card

    @property
    def account_id(self) -> int:
        return self.card.account_id


@dataclass
class World:
    ledger: Ledger
    directory: Directory
    vault: Vault
    records: Records
    accounts: Accounts
    pos: PosService
    terminals: dict[str, Terminal] = field(default_factory=dict)
    floats: dict[str, int] = field(default_factory=dict)

    @classmethod
    async def make(cls, ledger: Ledger) -> World:
        engine = ledger.store.engine
        directory = Directory(engine)
        vault = Vault(KEK)
        records = Records(engine)
        accounts = Accounts(ledger)
        pos = PosService(
            ledger,
            directory,
            vault.token_key,
            pin_of=security.zone_pin_reader(KEK),
            accounts=accounts,
            pins=Pins(records, vault, directory),
        )
        world = cls(ledger, directory, vault, records, accounts, pos)
        [asset] = await ledger.submit([CreateAsset(CURRENCY, AssetKind.CURRENCY, 2, "Renminbi")])
        assert asset.ok, asset
        for entity in STORE_OF:
            world.terminals[entity] = await world.terminal(entity)
            world.floats[entity] = await world._account(entity, "entity", entity, "card_float")
        return world

    async def _account(
        self, entity: str, kind: str, owner: str, purpose: str, flags: AccountFlags | None = None
    ) -> int:
        op = CreateAccount(CURRENCY, entity, kind, owner, purpose, flags or AccountFlags())
        [made] = await self.ledger.submit([op])
        assert made.ok and made.account_id is not None, made
        return made.account_id

    async def terminal(self, entity: str) -> Terminal:
        store = STORE_OF[entity]
        tid = f"T{next(_tids):07d}"
        t = Terminal(
            tid=tid,
            mid=f"M{tid}000000",
            store=store,
            legal_entity=entity,
            key_mode="aes",
            tmk_sealed="00",
            state="active",
            batch="000001",
            batch_cycle=0,
            sales_account=await self.accounts.store(entity, store, "sales"),
            cash_account=await self.accounts.store(entity, store, "cash"),
        )
        await self.directory.add_terminal(t, _now_ms())
        return t

    async def card_class(self, code: str, *, discount_bp: int = 0, balance_max: int = 0) -> None:
        async with self.records.begin() as uow:
            await uow.insert(
                "card_classes",
                {
                    "code": code,
                    "name": f"class {code}",
                    "named": True,
                    "gift": False,
                    "denominations": "[]",
                    "discount_bp": discount_bp,
                    "points_multiplier_pct": 100,
                    "issue_fee": 0,
                    "replace_fee": 0,
                    "balance_max": balance_max,
                    "validity_months": 0,
                    "state": "active",
                    "created_at_ms": _now_ms(),
                    "updated_at_ms": _now_ms(),
                },
            )

    async def member(self, entity: str) -> int:
        async with self.records.begin() as uow:
            member_id = await uow.insert(
                "members",
                {
                    "mobile": None,
                    "name": "Test Member",
                    "gender": "f",
                    "birthday": "1990-01-01",
                    "id_type": "none",
                    "id_hash": None,
                    "id_sealed": "",
                    "id_masked": "",
                    "email": "",
                    "sms_alerts": False,
                    "sms_marketing": False,
                    "tier": "",
                    "home_store": STORE_OF[entity],
                    "legal_entity": entity,
                    "state": "active",
                    "merged_into": None,
                    "created_at_ms": _now_ms(),
                    "updated_at_ms": _now_ms(),
                },
            )
        assert member_id is not None
        return member_id

    async def card(
        self,
        entity: str,
        balance: int,
        *,
        class_code: str = "",
        pin: str | None = None,
        member: bool = True,
        balance_max: int = 0,
    ) -> Issued:
        """A new active card of `entity`, funded from the entity's card float."""
        pan = new_pan()
        token = self.vault.card_token(pan)
        account_id = await self._account(
            entity, "card", token[:32], "stored_value", AccountFlags(no_overdraft=True)
        )
        extra: dict[str, Any] = {"pvv": "" if pin is None else self.vault.pvv(token, pin)}
        if pin is not None:
            logscan.SCAN.remember("a test PIN", pin)
        if member:
            extra["member_id"] = await self.member(entity)
        card = Card(
            token=token,
            pan_masked=mask_pan(pan),
            legal_entity=entity,
            account_id=account_id,
            expires="",
            state="active",
            balance_max=balance_max,
            class_code=class_code,
            store=STORE_OF[entity],
            named=member,
            has_pin=pin is not None,
        )
        [numbered] = await self.directory.add_cards([card], _now_ms(), [extra])
        if balance:
            await self.fund(account_id, balance, entity)
        return Issued(pan, numbered)

    async def fund(self, account_id: int, amount: int, entity: str = "LE-A") -> None:
        op = CreateTransfer(
            client="test",
            key=f"fund/{account_id}/{secrets.token_hex(6)}",
            asset=CURRENCY,
            postings=(
                Posting(self.floats[entity], Side.DEBIT, amount),
                Posting(account_id, Side.CREDIT, amount),
            ),
        )
        [done] = await self.ledger.submit([op])
        assert done.ok, done

    async def set_state(self, issued: Issued, state: str) -> None:
        async with self.records.begin() as uow:
            await uow.update("cards", {"id": issued.card.id}, {"state": state})
        self.directory.forget_card(issued.card.token)

    async def account(self, account_id: int) -> Account:
        found = await self.ledger.account(account_id)
        assert found is not None
        return found

    async def available(self, account_id: int) -> int:
        b = (await self.account(account_id)).balance
        return b.credits_posted - b.debits_posted - b.debits_pending

    async def transfer(self, t: Terminal, stan: str) -> dict[str, Any]:
        found = await self.directory.transfer_by_key(transaction_key(t, t.batch, stan))
        assert found is not None
        return found

    async def ask(self, *requests: PosRequest) -> list[PosResult]:
        return await self.pos.handle(list(requests))

    async def one(self, request: PosRequest) -> PosResult:
        [answer] = await self.pos.handle([request])
        return answer


def stan() -> str:
    return f"{next(_stans) % 999_999 + 1:06d}"


def zone_block(pin: str, pan: str) -> str:
    """The PIN block the gateway hands the host: format 4 under the zone PIN key."""
    block = security.pin_block_4(pin, pan, security.zone_pin_key(KEK)).hex().upper()
    logscan.SCAN.remember("a test PIN block", block)
    return block


def request(kind: Kind, t: Terminal, issued: Issued | None = None, **fields: Any) -> PosRequest:
    """A host request as the gateway builds it: the terminal's open batch, a new STAN."""
    return PosRequest(
        kind=kind,
        terminal=t.tid,
        batch=fields.pop("batch", t.batch),
        stan=fields.pop("stan", stan()),
        card="" if issued is None else issued.pan,
        **fields,
    )


def _now_ms() -> int:
    return int(time.time() * 1000)
