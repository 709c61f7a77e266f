"""`migrate.check_kek`: a database knows the check value of the key-encrypting key it was
sealed with, and refuses to start with another (a wrong key found no card, counted every
PIN wrong and sealed new cards so that the right key never opens them)."""

from __future__ import annotations

import asyncio

import pytest

from cardcore import migrate
from cardcore.vault import kek_check_value
from tests.helpers import sql_rows

pytestmark = pytest.mark.asyncio

RIGHT, WRONG = bytes(range(32)), bytes(range(1, 33))


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
