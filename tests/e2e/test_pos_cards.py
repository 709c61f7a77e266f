"""The POS messages on the cards of issue 4, end to end over the card protocol: a real
`cardcore serve` (ledger, host and gateway), the reference terminal over TCP, on SQLite and
PostgreSQL.

Terminals of two legal entities (an AES and a 3DES one) and cards are made through the host's
internal API; the card class (a discount and a maximum balance), the member, the PIN (its
verification value, from the server's key-encrypting key) and the states of the declined
cards are written to the database before the host first reads each card (the admin API for
them belongs to another part of issue 4). Then: balance inquiry with the class discount,
purchases with and without the PIN (wrong, right, locked), a purchase and a top-up across
legal entities (each entity's legs balance), the class maximum, split tender, void, refund,
settlement, and the declines of frozen, lost, closed and replaced cards. The module's last
test stops the servers and runs `cardcore ledger verify` on each database.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import text

from cardcore import limits
from cardcore.db import make_engine
from cardcore.frontend_gateway import codec
from cardcore.frontend_gateway.security import KeyMode
from cardcore.vault import Vault
from tests.e2e.pos_support import CardcoreServer, CertTerminal, Issued, Kit, server_fixtures
from tests.helpers import run_cardcore

pytestmark = pytest.mark.timeout(180)

ENTITY_A, ENTITY_B = "LE-CARD-A", "LE-CARD-B"
PIN = "730519"
WRONG_PIN = "111111"


# --- servers -----------------------------------------------------------------------------------


sqlite_server, postgresql_server, server, kit = server_fixtures("pos-cards")


# --- the records the admin services would write ----------------------------------------------


async def sql(db_url: str, statement: str, **params: Any) -> list[dict[str, Any]]:
    engine = make_engine(db_url, pool_size=1)
    try:
        async with engine.begin() as conn:
            result = await conn.execute(text(statement), params)
            return [dict(r) for r in result.mappings()] if result.returns_rows else []
    finally:
        await engine.dispose()


@dataclass
class Cards:
    """Issues cards of a legal entity with a class, a member, a PIN, a state."""

    kit: Kit

    @property
    def db(self) -> str:
        return self.kit.server.db_url

    @property
    def vault(self) -> Vault:
        return Vault(bytes.fromhex(self.kit.server.env["CARDCORE_KEK"]))

    async def card_class(self, *, discount_bp: int, balance_max: int) -> str:
        code = "C" + secrets.token_hex(4).upper()
        now = int(time.time() * 1000)
        await sql(
            self.db,
            "INSERT INTO card_classes (code, name, named, gift, denominations, discount_bp, "
            "points_multiplier_pct, issue_fee, replace_fee, balance_max, validity_months, "
            "state, created_at_ms, updated_at_ms) VALUES (:code, :code, :named, :gift, '[]', "
            ":bp, 100, 0, 0, :max, 0, 'active', :now, :now)",
            code=code,
            named=True,
            gift=False,
            bp=discount_bp,
            max=balance_max,
            now=now,
        )
        return code

    async def member(self, entity: str) -> int:
        now = int(time.time() * 1000)
        rows = await sql(
            self.db,
            "INSERT INTO members (mobile, name, gender, birthday, id_type, id_hash, id_sealed, "
            "id_masked, email, sms_alerts, sms_marketing, tier, home_store, legal_entity, "
            "state, merged_into, created_at_ms, updated_at_ms) VALUES (NULL, 'E2E Member', "
            "'m', '1985-05-05', 'none', NULL, '', '', '', :no, :no, '', 'S-E2E', :entity, "
            "'active', NULL, :now, :now) RETURNING id",
            no=False,
            entity=entity,
            now=now,
        )
        return int(rows[0]["id"])

    async def issue(
        self,
        entity: str,
        balance: int,
        *,
        class_code: str = "",
        pin: str | None = None,
        state: str = "active",
    ) -> Issued:
        answer = await self.kit.post(
            "/internal/v1/cards", {"legal_entity": entity, "count": 1, "balance": balance}
        )
        [raw] = answer["cards"]
        card = Issued(str(raw["pan"]), int(raw["account_id"]))
        self.kit.server.vault[f"pan of account {card.account_id}"] = card.pan
        token = self.vault.card_token(card.pan)
        pvv = ""
        if pin is not None:
            pvv = self.vault.pvv(token, pin)
            self.kit.server.vault[f"pin of account {card.account_id}"] = pin
        await sql(
            self.db,
            "UPDATE cards SET class_code = :cls, member_id = :member, named = :named, "
            "pvv = :pvv, state = :state WHERE token = :token",
            cls=class_code,
            member=await self.member(entity),
            named=True,
            pvv=pvv,
            state=state,
            token=token,
        )
        return card

    async def legs(self, transfer_id: int) -> dict[str, list[int]]:
        """Per legal entity: [debits, credits] of the transfer's legs."""
        [row] = await sql(
            self.db, "SELECT postings FROM ledger_transfers WHERE id = :id", id=transfer_id
        )
        out: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for account_id, side, amount in json.loads(row["postings"]):
            [acct] = await sql(
                self.db, "SELECT legal_entity FROM ledger_accounts WHERE id = :id", id=account_id
            )
            out[acct["legal_entity"]][0 if side == "debit" else 1] += amount
        return dict(out)

    async def metadata(self, transfer_id: int) -> dict[str, str]:
        [row] = await sql(
            self.db, "SELECT metadata FROM ledger_transfers WHERE id = :id", id=transfer_id
        )
        meta: dict[str, str] = json.loads(row["metadata"])
        return meta


async def terminal(kit: Kit, entity: str, mode: KeyMode) -> CertTerminal:
    """A terminal of a store of `entity`, registered and signed on."""
    tid = "E" + secrets.token_hex(4)[:7].upper()
    body = {
        "tid": tid,
        "mid": f"M{tid}000000",
        "store": f"S-{entity}-{tid}",
        "legal_entity": entity,
        "key_mode": str(mode),
    }
    answer = await kit.post("/internal/v1/terminals", body)
    kit.server.vault[f"tmk {tid}"] = answer["tmk"]
    from tests.e2e.pos_support import Registered  # noqa: PLC0415 - one use

    reg = Registered(tid, f"M{tid}000000", mode, bytes.fromhex(answer["tmk"]), answer["kcv"])
    term = kit.terminal_for(reg)
    assert (await term.sign_on()).code == "00"
    return term


# --- the flows ------------------------------------------------------------------------------------


async def test_discount_card_with_a_pin_across_two_legal_entities(kit: Kit) -> None:
    cards = Cards(kit)
    at_a = await terminal(kit, ENTITY_A, KeyMode.AES)
    at_b = await terminal(kit, ENTITY_B, KeyMode.TDES)
    vip = await cards.card_class(discount_bp=500, balance_max=20_000)
    card = await cards.issue(ENTITY_A, 10_000, class_code=vip, pin=PIN)

    # Balance inquiry: the balance and the class discount (F48 TLV DB).
    inquiry = await at_a.inquiry(card.pan)
    assert (inquiry.code, inquiry.balance, inquiry.discount_bp) == ("00", 10_000, 500)
    assert inquiry.fields["48"] == "DB003500"

    # A card with a PIN: none is 55, a wrong one 55, the right one pays the member price.
    assert (await at_a.purchase(card.pan, 2_232)).code == "55"
    assert (await at_a.purchase(card.pan, 2_232, WRONG_PIN)).code == "55"
    sale = await at_a.purchase(card.pan, 2_232, PIN)
    assert (sale.code, sale.balance) == ("00", 7_768), sale.fields
    meta = await cards.metadata(int(sale.fields["37"]))
    assert (meta["card_class"], meta["discount_bp"]) == (vip, "500")
    [failures] = await sql(
        cards.db, "SELECT pin_failures FROM cards WHERE pan_masked LIKE :end",
        end=f"%{card.pan[-4:]}",
    )  # fmt: skip
    assert failures["pin_failures"] == 0  # the right PIN reset the count

    # At a store of the other legal entity (3DES, format 0 PIN block): clearing legs.
    across = await at_b.purchase(card.pan, 1_000, PIN)
    assert (across.code, across.balance) == ("00", 6_768), across.fields
    assert await cards.legs(int(across.fields["37"])) == {
        ENTITY_A: [1_000, 1_000],
        ENTITY_B: [1_000, 1_000],
    }
    # A top-up there too, within the class maximum, and one past it (61, nothing moves).
    topup = await at_b.topup(card.pan, 5_000)
    assert topup.code == "00", topup.fields
    assert await cards.legs(int(topup.fields["37"])) == {
        ENTITY_A: [5_000, 5_000],
        ENTITY_B: [5_000, 5_000],
    }
    assert (await at_b.topup_confirm(topup.fields["11"], 5_000)).code == "00"
    before = await kit.account(card.account_id)
    assert (await at_b.topup(card.pan, 20_000 - 11_768 + 1)).code == "61"
    assert await kit.account(card.account_id) == before
    assert await kit.available(card.account_id) == 11_768

    # Split tender: the terminal takes partial approvals; the card pays all it has.
    split = await at_a.purchase(card.pan, 15_000, PIN, partial=True)
    assert (split.code, split.approved_amount, split.balance, split.remainder) == (
        "10",
        11_768,
        0,
        15_000 - 11_768,
    ), split.fields
    assert await kit.available(card.account_id) == 0
    # The void names the amount taken; the refund of the cross-entity sale gives back part.
    assert (await at_a.void(card.pan, 15_000, split.fields["11"])).code == "64"
    void = await at_a.void(card.pan, 11_768, split.fields["11"])
    assert (void.code, void.balance) == ("00", 11_768), void.fields
    refund = await at_b.refund(card.pan, 400, across.fields["37"], at_b.batch,
                               across.fields["11"])  # fmt: skip
    assert (refund.code, refund.balance) == ("00", 12_168), refund.fields
    assert await cards.legs(int(refund.fields["37"])) == {
        ENTITY_A: [400, 400],
        ENTITY_B: [400, 400],
    }

    # Both terminals settle balanced: the host's totals count the amounts each took.
    for term, expected in ((at_a, (2_232, 1, 0, 0)), (at_b, (1_000, 1, 5_400, 2))):
        assert term.totals() == codec.Totals(*expected)
        settled = await term.settle()
        assert settled.code == "00" and settled.fields["48"][30] == "1", settled.fields


async def test_cards_not_active_are_declined_with_their_codes(kit: Kit) -> None:
    cards = Cards(kit)
    term = await terminal(kit, ENTITY_A, KeyMode.AES)
    for state, code in (("frozen", "62"), ("lost", "41"), ("closed", "14"), ("replaced", "14"),
                        ("inactive", "62")):  # fmt: skip
        card = await cards.issue(ENTITY_A, 5_000, state=state)
        before = await kit.account(card.account_id)
        for reply in (
            await term.inquiry(card.pan),
            await term.purchase(card.pan, 100),
            await term.topup(card.pan, 100),
        ):
            assert reply.code == code, (state, reply.fields)
        assert await kit.account(card.account_id) == before, state


async def test_pin_lockout_over_the_wire(kit: Kit) -> None:
    cards = Cards(kit)
    at_a = await terminal(kit, ENTITY_A, KeyMode.AES)
    at_b = await terminal(kit, ENTITY_B, KeyMode.TDES)
    card = await cards.issue(ENTITY_A, 5_000, pin=PIN)
    terms = [at_a, at_b]

    async def wrong(i: int) -> str:
        return (await terms[i % 2].purchase(card.pan, 100, WRONG_PIN)).code

    codes = [await wrong(i) for i in range(limits.PIN_FAILURES_MAX + 2)]
    assert codes == ["55"] * (limits.PIN_FAILURES_MAX - 1) + ["75"] * 3
    for term in terms:  # locked: the right PIN too, at any terminal
        assert (await term.purchase(card.pan, 100, PIN)).code == "75"
    assert await kit.available(card.account_id) == 5_000
    # Concurrent wrong PINs of another card on several terminals lock it at the bound too.
    other = await cards.issue(ENTITY_A, 5_000, pin=PIN)
    more = [await terminal(kit, ENTITY_A, KeyMode.AES) for _ in range(4)]
    answers = []
    for _ in range(2):  # each terminal one request at a time; the four of them at once
        answers += await asyncio.gather(*(t.purchase(other.pan, 100, WRONG_PIN) for t in more))
    assert sorted(a.code for a in answers) == ["55"] * (limits.PIN_FAILURES_MAX - 1) + ["75"] * (
        8 - limits.PIN_FAILURES_MAX + 1
    )
    assert (await at_a.purchase(other.pan, 100, PIN)).code == "75"
    assert await kit.available(other.account_id) == 5_000


async def test_zz_the_ledger_verifies(server: CardcoreServer) -> None:
    """Last in the module: stops the server and verifies its journal."""
    assert await asyncio.to_thread(server.stop) == 0
    done = await asyncio.to_thread(
        run_cardcore, "ledger", "verify", "--db", server.db_url, cwd=server.workdir
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert '"status": "ok"' in done.stdout, done.stdout
