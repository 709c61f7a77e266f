"""`migrate.check_kek`: a database knows the check value of the key-encrypting key it was
sealed with, and refuses to start with another (a wrong key found no card, counted every
PIN wrong and sealed new cards so that the right key never opens them)."""

from __future__ import annotations

import asyncio

import pytest

from cardcore import migrate
from cardcore.vault import kek_check_value
from tests.helpers import AdminClient, ApiClient, sql_rows

pytestmark = pytest.mark.asyncio

RIGHT, WRONG = bytes(range(32)), bytes(range(1, 33))  # RIGHT: the `admin` fixture's KEK


async def test_the_first_key_is_recorded_and_another_is_refused(db_url: str) -> None:
    await asyncio.gather(*(migrate.check_kek(db_url, RIGHT, now_ms=5) for _ in range(3)))
    rows = await sql_rows(db_url, "SELECT * FROM vault_keys")
    assert rows == [{"name": "kek", "check_value": kek_check_value(RIGHT), "created_at_ms": 5}]
    assert RIGHT.hex() not in str(rows) and len(rows[0]["check_value"]) == 16
    await migrate.check_kek(db_url, RIGHT)  # the database's own: starts
    with pytest.raises(migrate.WrongKek, match="not this database's") as refused:
        await migrate.check_kek(db_url, WRONG)
    assert kek_check_value(WRONG) in str(refused.value)
    assert WRONG.hex() not in str(refused.value)
    assert await sql_rows(db_url, "SELECT * FROM vault_keys") == rows  # nothing changed


async def _only_the_key_that_opens_it_is_recorded(db_url: str) -> None:
    """A database as after the upgrade to 0019 (no row): the wrong key is refused and
    recorded nowhere, the right one recorded."""
    assert await sql_rows(db_url, "SELECT * FROM vault_keys") == []  # as after the upgrade
    with pytest.raises(migrate.WrongKek, match="does not open what this database sealed"):
        await migrate.check_kek(db_url, WRONG)
    assert await sql_rows(db_url, "SELECT * FROM vault_keys") == []
    await migrate.check_kek(db_url, RIGHT)
    [row] = await sql_rows(db_url, "SELECT check_value FROM vault_keys")
    assert row["check_value"] == kek_check_value(RIGHT)


async def test_an_upgraded_database_records_only_the_key_that_opens_what_it_sealed(
    admin: AdminClient, db_url: str
) -> None:
    """Migration 0019 adds no row: the first start after the upgrade recorded whatever key
    it was given, and the right one was refused from then on (a review of this change). The
    key is first tried on what the database sealed: a terminal's master key here."""
    await admin.org("LE1", "S1")
    await admin.ok("POST", "/v1/terminals", json={"tid": "T0000001", "mid": "M00000000000001",
                                                  "store": "S1"})  # fmt: skip
    await _only_the_key_that_opens_it_is_recorded(db_url)


async def test_an_upgraded_database_without_terminals_proves_the_key_on_a_card_number(
    admin: AdminClient, db_url: str
) -> None:
    """No terminal sealed anything: the key is tried on a card's sealed number instead."""
    await admin.org("LE1", "S1")
    await admin.ok("POST", "/v1/card-classes", json={"code": "GIFT", "name": "Gift",
                   "named": False, "gift": True, "denominations": [10_000]})  # fmt: skip
    await admin.ok("POST", "/v1/grants", json={"store": "S1", "function": "gift"})
    await admin.ok("POST", "/v1/cards", json={"class_code": "GIFT", "store": "S1"})
    assert await sql_rows(db_url, "SELECT tid FROM pos_terminals") == []
    await _only_the_key_that_opens_it_is_recorded(db_url)


async def test_the_host_says_its_keys_check_value_and_never_the_key(
    admin: AdminClient,
) -> None:
    """`cardcore gateway` compares its key with the ledger's through this route."""
    status, answer = await admin.call("GET", "/internal/v1/kek", token="")
    assert (status, answer) == (200, {"check_value": kek_check_value(RIGHT)})


async def test_a_host_without_a_key_says_so(api: ApiClient) -> None:
    without = await api.get("/internal/v1/kek")
    assert (without.status, (await without.json())["error"]["code"]) == (503, "pos_disabled")
