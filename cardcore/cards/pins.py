"""Card PINs: set, check with lockout, unlock. The PIN itself is never stored or logged; the
card keeps a verification value (`cardcore.vault.Vault.pvv`) and a count of wrong PINs in a
row.

The lockout holds under concurrent wrong PINs because the count moves in the database with a
guarded update (`pin_failures + 1` only while below the bound), never read-then-write: of N
simultaneous wrong PINs at most PIN_FAILURES_MAX are counted and every later one is refused
as locked, even the right PIN, until an officer unlocks the card.
"""

from __future__ import annotations

import enum

from cardcore import limits
from cardcore.cards.directory import Directory
from cardcore.records import Records, Unit
from cardcore.vault import Vault

CARDS = "cards"


class PinCheck(enum.StrEnum):
    OK = "ok"
    WRONG = "wrong"  # counted; the card is not locked yet
    LOCKED = "locked"  # too many wrong PINs in a row (this one may have been the last)
    NOT_SET = "not_set"


def pin_is_valid(pin: str) -> bool:
    return (
        pin.isascii()
        and pin.isdigit()
        and limits.PIN_DIGITS_MIN <= len(pin) <= limits.PIN_DIGITS_MAX
    )


class Pins:
    def __init__(self, records: Records, vault: Vault, directory: Directory) -> None:
        self.records = records
        self.vault = vault
        self.directory = directory

    async def set(self, uow: Unit, card_id: int, token: str, pin: str) -> None:
        """Set or change the PIN (the caller checked the officer and audits in `uow`); the
        count of wrong PINs starts again."""
        if not pin_is_valid(pin):
            raise ValueError("a PIN is 4 to 6 digits")
        await uow.update(
            CARDS, {"id": card_id}, {"pvv": self.vault.pvv(token, pin), "pin_failures": 0}
        )
        self.directory.forget_card(token)

    async def unlock(self, uow: Unit, card_id: int) -> None:
        await uow.update(CARDS, {"id": card_id}, {"pin_failures": 0})

    async def check(self, card_id: int, pin: str) -> tuple[PinCheck, int]:
        """(verdict, wrong PINs in a row after this check)."""
        async with self.records.begin() as uow:
            # A write first: the row lock on PostgreSQL, the write lock on SQLite, so checks
            # of one card run one after another instead of failing as "database is locked".
            await uow.update(CARDS, {"id": card_id}, {"pin_failures": ("+", 0)})
            card = await uow.get(CARDS, id=card_id)
            if card is None or not card["pvv"]:
                return PinCheck.NOT_SET, 0
            failures = int(card["pin_failures"])
            if failures >= limits.PIN_FAILURES_MAX:
                return PinCheck.LOCKED, failures
            if pin_is_valid(pin) and self.vault.pin_matches(card["token"], pin, card["pvv"]):
                if failures:
                    await uow.update(CARDS, {"id": card_id}, {"pin_failures": 0})
                return PinCheck.OK, 0
            counted = await uow.update(
                CARDS,
                {"id": card_id},
                {"pin_failures": ("+", 1)},
                at_most={"pin_failures": limits.PIN_FAILURES_MAX},
            )
            after = await uow.get(CARDS, id=card_id)
        now = int(after["pin_failures"]) if after is not None else failures
        if not counted or now >= limits.PIN_FAILURES_MAX:
            return PinCheck.LOCKED, now
        return PinCheck.WRONG, now
