"""Host routes the front-end gateway and the bootstrap tools call (internal: loopback or
the internal token).

POST /internal/v1/pos         many terminals' POS requests at once; one answer each, in order
POST /internal/v1/terminals   register a terminal; answers its master key once
POST /internal/v1/cards       issue stored-value cards; answers their numbers once
"""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web

from cardcore import limits
from cardcore.api.edge import ApiError, read_json
from cardcore.cards import admin
from cardcore.cards.model import (
    Outcome,
    PosRequest,
    PosRequestError,
    PosResult,
    parse_requests,
)
from cardcore.cards.pos import PosService
from cardcore.frontend_gateway import security
from cardcore.org.http import ORG_KEY
from cardcore.vault import Vault, kek_check_value

POS_KEY = web.AppKey("pos", PosService)
KEK_KEY = web.AppKey("kek", bytes)

_NAME = re.compile(r"[A-Za-z0-9._:-]{1,64}")


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_post("/internal/v1/pos", _post_pos)
    router.add_post("/internal/v1/terminals", _post_terminal)
    router.add_post("/internal/v1/cards", _post_cards)
    router.add_get("/internal/v1/kek", _get_kek)


async def _get_kek(request: web.Request) -> web.Response:
    """The check value of the host's key-encrypting key (never the key): a gateway compares
    it with its own before it serves terminals (`cardcore gateway`)."""
    return web.json_response({"check_value": kek_check_value(request.app[KEK_KEY])})


async def _post_pos(request: web.Request) -> web.Response:
    body = await read_json(request)
    try:
        parsed = parse_requests(body)
    except PosRequestError as exc:
        raise ApiError(400, "invalid_pos_request", str(exc), exc.field) from None
    valid = [r for r in parsed if isinstance(r, PosRequest)]
    answers = iter(await request.app[POS_KEY].handle(valid))
    results = [
        next(answers) if isinstance(r, PosRequest) else PosResult(Outcome.BAD_REQUEST)
        for r in parsed
    ]
    return web.json_response({"results": [r.json() for r in results]})


def _object(body: object, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ApiError(400, "wrong_type", "expected a JSON object")
    unknown = set(body) - allowed
    if unknown:
        raise ApiError(400, "unknown_field", "field is not allowed", min(unknown))
    return body


def _text(body: dict[str, Any], name: str, pattern: re.Pattern[str], default: str = "") -> str:
    value = body.get(name, default)
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise ApiError(400, "invalid_value", f"{name} must match {pattern.pattern}", name)
    return value


def _int(body: dict[str, Any], name: str, high: int) -> int:
    value = body.get(name, 0)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= high:
        raise ApiError(400, "invalid_value", f"{name} is an integer 0..{high}", name)
    return value


async def _post_terminal(request: web.Request) -> web.Response:
    body = _object(await read_json(request), {"tid", "mid", "store", "legal_entity", "key_mode"})
    tid = _text(body, "tid", re.compile(r"[A-Za-z0-9]{8}"))
    mid = _text(body, "mid", re.compile(r"[A-Za-z0-9]{15}"))
    store = _text(body, "store", _NAME)
    entity = _text(body, "legal_entity", _NAME)
    mode_text = _text(body, "key_mode", re.compile(r"aes|3des"), "aes")
    await request.app[ORG_KEY].check_bootstrap_place(entity, store)
    mode, tmk, sealed = new_master_key(request.app[KEK_KEY], tid, mode_text)
    pos = request.app[POS_KEY]
    try:
        await admin.add_terminal(
            pos.ledger,
            pos.directory,
            tid=tid,
            mid=mid,
            store=store,
            legal_entity=entity,
            key_mode=str(mode),
            tmk_sealed=sealed,
        )
    except admin.AdminError as exc:
        raise ApiError(409, "terminal_refused", str(exc), "tid") from None
    return web.json_response({"tid": tid, **master_key_answer(mode, tmk)}, status=201)


def new_master_key(kek: bytes, tid: str, mode_text: str) -> tuple[security.KeyMode, bytes, str]:
    """A fresh terminal master key and its sealed form (hex) for the terminal record."""
    mode = security.KeyMode(mode_text)
    tmk = security.new_key(mode)
    return mode, tmk, security.seal(kek, tmk, b"tmk:" + tid.encode()).hex()


def master_key_answer(mode: security.KeyMode, tmk: bytes) -> dict[str, str]:
    """The key as the registering officer sees it, once: to inject into the terminal."""
    return {
        "key_mode": str(mode),
        "tmk": tmk.hex().upper(),
        "kcv": security.check_value(mode, tmk).hex().upper(),
    }


async def _post_cards(request: web.Request) -> web.Response:
    body = _object(
        await read_json(request), {"legal_entity", "count", "balance", "balance_max", "expires"}
    )
    entity = _text(body, "legal_entity", _NAME)
    count = _int(body, "count", limits.CARD_ISSUE_BATCH_MAX)
    balance = _int(body, "balance", limits.POS_AMOUNT_MAX)
    balance_max = _int(body, "balance_max", limits.POS_AMOUNT_MAX)
    expires = _text(body, "expires", re.compile(r"(|[0-9]{2}(0[1-9]|1[0-2]))"))
    if count == 0:
        raise ApiError(400, "invalid_value", "count must be at least 1", "count")
    if balance_max and balance > balance_max:
        raise ApiError(400, "invalid_value", "balance is at most balance_max", "balance")
    await request.app[ORG_KEY].check_bootstrap_place(entity, None)
    pos = request.app[POS_KEY]
    try:
        issued = await admin.issue_cards(
            pos.ledger,
            pos.directory,
            Vault(request.app[KEK_KEY]),
            legal_entity=entity,
            count=count,
            balance=balance,
            balance_max=balance_max,
            expires=expires,
        )
    except admin.AdminError as exc:
        raise ApiError(409, "cards_refused", str(exc)) from None
    cards = [{"pan": c.pan, "account_id": c.account_id} for c in issued]
    return web.json_response({"cards": cards}, status=201)
