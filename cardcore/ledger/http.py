"""Ledger HTTP routes.

POST /internal/v1/ops                 a batch of operations, one result each, in order
GET  /internal/v1/journal?after=&limit=   committed batches in order (standbys, relays)
GET  /internal/v1/accounts/{id}                account and balances
GET  /internal/v1/accounts/{id}/entries        the account's journal entries, paged
"""

from __future__ import annotations

import re

from aiohttp import web

from cardcore import limits
from cardcore.api.edge import ApiError, read_json
from cardcore.ledger import wire
from cardcore.ledger.service import Ledger
from cardcore.ledger.writer import Busy, LedgerUnavailable

LEDGER_KEY = web.AppKey("ledger", Ledger)
_DIGITS = re.compile(r"[0-9]{1,19}")


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_post("/internal/v1/ops", _post_ops)
    router.add_get("/internal/v1/journal", _get_journal)
    router.add_get("/internal/v1/accounts/{account_id}", _get_account)
    router.add_get("/internal/v1/accounts/{account_id}/entries", _get_entries)


async def _post_ops(request: web.Request) -> web.Response:
    body = await read_json(request)
    try:
        _client, ops = wire.parse_ops_request(body)
    except wire.RequestError as exc:
        raise ApiError(400, exc.code, exc.message, exc.field) from None
    ledger = request.app[LEDGER_KEY]
    try:
        results = await ledger.submit(ops)
    except Busy:
        raise ApiError(503, "busy", "the ledger is at capacity; retry shortly") from None
    except LedgerUnavailable as exc:
        raise ApiError(503, "ledger_unavailable", str(exc)) from None
    return web.json_response({"results": [wire.result_json(r) for r in results]})


async def _get_journal(request: web.Request) -> web.Response:
    after = _int_param(request, "after", default=0, low=0, high=limits.BALANCE_MAX)
    limit = _int_param(
        request,
        "limit",
        default=limits.JOURNAL_PAGE_BATCHES_MAX,
        low=1,
        high=limits.JOURNAL_PAGE_BATCHES_MAX,
    )
    batches = await request.app[LEDGER_KEY].journal_page(after, limit)
    next_after = batches[-1]["seq"] if batches else after
    return web.json_response({"batches": batches, "next_after": next_after})


async def _get_account(request: web.Request) -> web.Response:
    account_id = _path_id(request)
    account = await request.app[LEDGER_KEY].account(account_id)
    if account is None:
        raise ApiError(404, "account_not_found", "no account with this id", "account_id")
    return web.json_response(wire.account_json(account))


async def _get_entries(request: web.Request) -> web.Response:
    account_id = _path_id(request)
    ledger = request.app[LEDGER_KEY]
    if await ledger.account(account_id) is None:
        raise ApiError(404, "account_not_found", "no account with this id", "account_id")
    limit = _int_param(
        request, "limit", default=limits.PAGE_LIMIT_DEFAULT, low=1, high=limits.PAGE_LIMIT_MAX
    )
    order = request.query.get("order", "asc")
    if order not in ("asc", "desc"):
        raise ApiError(400, "invalid_value", "order is asc or desc", "order")
    cursor = None
    if "cursor" in request.query:
        cursor = _int_param(request, "cursor", default=0, low=0, high=limits.BALANCE_MAX)
    rows = await ledger.entries(
        account_id, cursor=cursor, limit=limit, newest_first=order == "desc"
    )
    next_cursor = rows[-1]["id"] if len(rows) == limit else None
    return web.json_response(
        {"entries": [wire.entry_json(r) for r in rows], "next_cursor": next_cursor}
    )


def _path_id(request: web.Request) -> int:
    raw = request.match_info["account_id"]
    if not _DIGITS.fullmatch(raw) or not 1 <= int(raw) <= limits.BALANCE_MAX:
        raise ApiError(400, "invalid_value", "account id is a positive integer", "account_id")
    return int(raw)


def _int_param(request: web.Request, name: str, *, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    if not _DIGITS.fullmatch(raw):
        raise ApiError(400, "wrong_type", f"{name} is a non-negative integer", name)
    value = int(raw)
    if not low <= value <= high:
        raise ApiError(400, "invalid_value", f"{name} must be {low}..{high}", name)
    return value
