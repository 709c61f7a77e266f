"""The fee of a new card is recorded before it is taken and the record deleted with the
card's write: a fee whose card was never written (the server stopped, the request was
cancelled, in between) is given back by the sweep, once; a write that comes after the sweep
took its fee is refused; a fee never taken is barred by a tombstone (`card_fee_intents`,
`CardService.sweep_fee_intents`), on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest

from cardcore import limits
from cardcore.cards.admin_http import CARDS_KEY
from cardcore.cards.service import CardService, CardsUnavailable
from cardcore.ledger.decide import TOMBSTONE_CODE
from cardcore.org.http import ORG_KEY
from cardcore.org.model import Principal
from tests.helpers import AdminClient, sql_rows
from tests.integration.test_card_money import store_account
from tests.integration.test_cards_api import grant, member, new_class

STALE_MS = limits.CARD_FEE_INTENT_STALE_S * 1000


async def fees_net(db_url: str) -> int:
    fees = await store_account(db_url, "S1", "fees")
    return int(fees["credits_posted"]) - int(fees["debits_posted"])


async def intents(db_url: str) -> list[dict[str, Any]]:
    return await sql_rows(db_url, "SELECT key, state FROM card_fee_intents ORDER BY key")


async def shop(admin: AdminClient) -> CardService:
    await admin.org("LE1", "S1")
    await new_class(admin, "FEE", name="With fees", named=False, issue_fee=500)
    await grant(admin, "S1", "stored_value")
    service: CardService = admin.app[CARDS_KEY]
    return service


async def root(admin: AdminClient) -> Principal:
    principal = await admin.app[ORG_KEY].authenticate(admin.root)
    assert principal is not None
    return principal


def later(service: CardService, monkeypatch: pytest.MonkeyPatch, ms: int) -> None:
    now = service.clock_ms()
    monkeypatch.setattr(service, "clock_ms", lambda: now + ms)


async def test_an_issued_card_leaves_no_fee_record(admin: AdminClient, db_url: str) -> None:
    service = await shop(admin)
    await admin.ok("POST", "/v1/cards", json={"class_code": "FEE", "store": "S1"})
    assert await intents(db_url) == []
    assert await fees_net(db_url) == 500
    assert await service.sweep_fee_intents() == {"fees_settled": 0}


async def test_a_fee_whose_card_was_never_written_is_given_back_once(
    admin: AdminClient, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The request is cancelled between the fee and the card's write (as a server that
    stops there): the fee stands and its record stays; a sweep before the record is stale
    leaves it, one after gives the fee back, and another sweep gives back nothing more."""
    service = await shop(admin)

    async def cancelled(*_args: Any, **_kwargs: Any) -> Any:
        raise asyncio.CancelledError

    with monkeypatch.context() as patched:
        patched.setattr(service, "_write", cancelled)
        with pytest.raises(asyncio.CancelledError):
            await service.issue(await root(admin), "FEE", "S1", None)
    assert await fees_net(db_url) == 500
    [record] = await intents(db_url)
    assert record["state"] == "open"
    assert await service.sweep_fee_intents() == {"fees_settled": 0}  # not stale yet
    assert await fees_net(db_url) == 500
    later(service, monkeypatch, STALE_MS + 1)
    assert await service.sweep_fee_intents() == {"fees_settled": 1}
    assert await fees_net(db_url) == 0
    assert await intents(db_url) == []
    assert await service.sweep_fee_intents() == {"fees_settled": 0}
    assert await fees_net(db_url) == 0
    assert await sql_rows(db_url, "SELECT id FROM cards") == []


async def test_a_write_after_the_sweep_took_its_fee_is_refused(
    admin: AdminClient, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write that outlasts the stale bound: the sweep turns its record and gives the fee
    back, and the write then refuses (409 fee_given_back): no card, no fee."""
    service = await shop(admin)
    real = service._write
    entered, go_on = asyncio.Event(), asyncio.Event()

    async def slow(*args: Any, **kwargs: Any) -> Any:
        entered.set()  # its fee taken, its record open
        await go_on.wait()
        return await real(*args, **kwargs)

    monkeypatch.setattr(service, "_write", slow)
    issuing = asyncio.ensure_future(
        admin.call("POST", "/v1/cards", json={"class_code": "FEE", "store": "S1"})
    )
    await asyncio.wait_for(entered.wait(), 10)
    assert await fees_net(db_url) == 500
    later(service, monkeypatch, STALE_MS + 1)
    assert await service.sweep_fee_intents() == {"fees_settled": 1}
    go_on.set()
    status, answer = await issuing
    assert (status, answer["error"]["code"]) == (409, "fee_given_back")
    assert await fees_net(db_url) == 0
    assert await sql_rows(db_url, "SELECT id FROM cards") == []
    assert await intents(db_url) == []


async def test_a_fee_recorded_but_never_taken_is_barred(
    admin: AdminClient, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stopped after the record, before the fee: the sweep leaves a tombstone under the
    fee's key, so the fee can never land later; nothing was taken."""
    service = await shop(admin)

    async def stopped(*_args: Any, **_kwargs: Any) -> Any:
        raise asyncio.CancelledError

    with monkeypatch.context() as patched:
        patched.setattr(service, "_fee", stopped)
        with pytest.raises(asyncio.CancelledError):
            await service.issue(await root(admin), "FEE", "S1", None)
    [record] = await intents(db_url)
    later(service, monkeypatch, STALE_MS + 1)
    assert await service.sweep_fee_intents() == {"fees_settled": 1}
    [tombstone] = await sql_rows(
        db_url, "SELECT code FROM ledger_failures WHERE key = :k", k=record["key"]
    )
    assert tombstone["code"] == TOMBSTONE_CODE
    assert await sql_rows(db_url, "SELECT id FROM ledger_transfers") == []
    assert await intents(db_url) == []


async def test_a_refused_write_gives_its_fee_back_and_drops_the_record(
    admin: AdminClient, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A member deleted between the check and the write: the issue is refused, its fee
    given back at once, and no record is left for the sweep."""
    service = await shop(admin)
    await new_class(admin, "NAMED", name="Named, with a fee", named=True, issue_fee=500)
    await grant(admin, "S1", "stored_value")
    member_id = await member(admin)
    real = service._write

    async def deleted_meanwhile(*args: Any, **kwargs: Any) -> Any:
        await admin.ok("DELETE", f"/v1/members/{member_id}")
        return await real(*args, **kwargs)

    monkeypatch.setattr(service, "_write", deleted_meanwhile)
    status, answer = await admin.call(
        "POST", "/v1/cards", json={"class_code": "NAMED", "store": "S1", "member_id": member_id}
    )
    assert (status, answer["error"]["code"]) == (409, "member_not_active")
    assert await fees_net(db_url) == 0
    assert await intents(db_url) == []


async def test_the_server_sweeps_on_its_schedule(
    admin: AdminClient, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`sweeps_on_schedule` (run by the server) gives back a fee left behind without being
    asked, and keeps running when a sweep fails."""
    service = await shop(admin)

    async def cancelled(*_args: Any, **_kwargs: Any) -> Any:
        raise asyncio.CancelledError

    with monkeypatch.context() as patched:
        patched.setattr(service, "_write", cancelled)
        with pytest.raises(asyncio.CancelledError):
            await service.issue(await root(admin), "FEE", "S1", None)
    later(service, monkeypatch, STALE_MS + 1)
    failed = {"topups": 0}
    real = service.sweep_topup_grants

    async def failing_once() -> dict[str, int]:
        failed["topups"] += 1
        if failed["topups"] == 1:
            raise CardsUnavailable("the ledger went away")
        return await real()

    monkeypatch.setattr(service, "sweep_topup_grants", failing_once)
    job = asyncio.create_task(service.sweeps_on_schedule(0))
    try:
        for _ in range(500):
            if not await intents(db_url):
                break
            await asyncio.sleep(0.01)
    finally:
        job.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await job
    assert await intents(db_url) == []
    assert await fees_net(db_url) == 0
    assert failed["topups"] == 1  # failed, and the fee sweep still ran in the same turn


async def test_a_fee_given_back_by_its_request_is_settled_by_the_sweep_once(
    admin: AdminClient, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The request gave its fee back but its record stayed (the server stopped before the
    record's delete): the sweep's give-back is the same reversal, replayed, so the record
    is settled without an error and the fee is given back once."""
    service = await shop(admin)

    async def cancelled(*_args: Any, **_kwargs: Any) -> Any:
        raise asyncio.CancelledError

    with monkeypatch.context() as patched:
        patched.setattr(service, "_write", cancelled)
        with pytest.raises(asyncio.CancelledError):
            await service.issue(await root(admin), "FEE", "S1", None)
    [record] = await intents(db_url)
    await service._fee_back(record["key"], "S1", "root", "issue_fee_undone")
    assert await fees_net(db_url) == 0
    later(service, monkeypatch, STALE_MS + 1)
    assert await service.sweep_fee_intents() == {"fees_settled": 1}
    assert await intents(db_url) == []
    assert await fees_net(db_url) == 0
