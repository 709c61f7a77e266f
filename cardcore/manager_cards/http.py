"""Admin routes of manager special-discount cards: issue (the number answered in full once),
list, read, change (disable, enable, percent, daily total, reasons), set the PIN, and the
authorizations made with a card (every use at the POS, approved or refused). A PIN travels
only in a request body, never in an answer; without a key-encrypting key the routes answer
503 `kek_missing`.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from cardcore import limits
from cardcore.api import routes as r
from cardcore.manager_cards.model import ManagerState
from cardcore.manager_cards.service import ManagerCards
from cardcore.org.http import principal

MANAGER_CARDS_KEY = web.AppKey("manager_cards", ManagerCards)


def service(request: web.Request) -> ManagerCards:
    return r.feature(request, MANAGER_CARDS_KEY, "manager cards")


# --- schemas -------------------------------------------------------------------------------------

TIME_MS = r.TIME_MS
ID = r.integer(1, limits.RECORD_ID_MAX)
CODE = r.string(r.CODE, max_length=32)
REASON = r.string(
    f"[a-z][a-z0-9_]{{0,{limits.MANAGER_REASON_CHARS_MAX - 1}}}",
    max_length=limits.MANAGER_REASON_CHARS_MAX,
)
REASONS = {**r.array(REASON, limits.MANAGER_REASONS_MAX), "minItems": 1, "uniqueItems": True}
STATE = r.enum([x.value for x in ManagerState])
POLICY: dict[str, r.Schema] = {
    "max_percent_bp": r.integer(1, limits.MANAGER_PERCENT_BP_MAX),
    "daily_total_fen": r.integer(1, limits.MANAGER_DAILY_FEN_MAX),
    "reasons": REASONS,
}
NEW_CARD = r.obj(
    {"staff_user_id": ID, "store": CODE, **POLICY},
    ["staff_user_id", "store", "max_percent_bp", "daily_total_fen", "reasons"],
)
CHANGES = {**r.obj({**POLICY, "state": STATE}), "minProperties": 1}
_CARD_PROPS: dict[str, r.Schema] = {
    "id": ID,
    "pan_masked": r.string(max_length=19),
    "staff_user_id": ID,
    "store": CODE,
    "legal_entity": CODE,
    **POLICY,
    "state": STATE,
    "has_pin": r.boolean(),
    "pin_failures": r.integer(0, 2**31),
    "created_at_ms": TIME_MS,
    "updated_at_ms": TIME_MS,
}
CARD = r.obj(_CARD_PROPS, list(_CARD_PROPS))
ISSUED = r.obj(
    {**_CARD_PROPS, "pan": r.string("628888[0-9]{13}", max_length=19)}, [*_CARD_PROPS, "pan"]
)
PIN = r.obj(
    {"pin": r.string(f"[0-9]{{{limits.PIN_DIGITS_MIN},{limits.PIN_DIGITS_MAX}}}",
                     max_length=limits.PIN_DIGITS_MAX)},
    ["pin"],
)  # fmt: skip
USE = r.obj(
    {
        "key": r.string(max_length=160),
        "card_id": r.integer(0, limits.RECORD_ID_MAX),
        "staff_user_id": r.integer(0, limits.RECORD_ID_MAX),
        "store": CODE,
        "terminal": r.string(max_length=8),
        "day": r.integer(0, 99_991_231),
        "bill_fen": r.integer(0, 2**62),
        "discount_fen": r.integer(0, 2**62),
        "reason": r.string(max_length=32),
        "outcome": r.string(max_length=32),
        "reversed": r.boolean(),
        "created_at_ms": TIME_MS,
    },
    ["key", "card_id", "staff_user_id", "store", "terminal", "day", "bill_fen",
     "discount_fen", "reason", "outcome", "reversed", "created_at_ms"],
)  # fmt: skip
FILTERS = {"store": CODE, "staff_user_id": ID, "state": STATE}
USES_QUERY = {"limit": r.integer(1, limits.PAGE_LIMIT_MAX), "after": r.string(max_length=160)}
CARD_PATH = {"card_id": ID}

# --- handlers ------------------------------------------------------------------------------------


def _card_id(request: web.Request) -> int:
    return r.path_int(request, "card_id", limits.RECORD_ID_MAX)


async def _post_card(request: web.Request) -> web.Response:
    s = service(request)
    b = await r.body(request, NEW_CARD)
    return web.json_response(await s.issue(principal(request), b), status=201)


async def _list_cards(request: web.Request) -> web.Response:
    s = service(request)
    q: dict[str, Any] = r.query(request, {**r.PAGE_QUERY, **FILTERS})
    limit = q.pop("limit", limits.PAGE_LIMIT_DEFAULT)
    after = r.cursor_int(q, limits.RECORD_ID_MAX)
    q.pop("after", None)
    return r.page(await s.list_cards(principal(request), q, after, limit), limit, "id")


async def _get_card(request: web.Request) -> web.Response:
    s = service(request)
    return web.json_response(await s.get(principal(request), _card_id(request)))


async def _patch_card(request: web.Request) -> web.Response:
    s = service(request)
    card_id = _card_id(request)
    b = await r.body(request, CHANGES)
    return web.json_response(await s.change(principal(request), card_id, b))


async def _set_pin(request: web.Request) -> web.Response:
    s = service(request)
    card_id = _card_id(request)
    b = await r.body(request, PIN)
    return web.json_response(await s.set_pin(principal(request), card_id, b["pin"]))


async def _authorizations(request: web.Request) -> web.Response:
    s = service(request)
    card_id = _card_id(request)
    q = r.query(request, USES_QUERY)
    limit = q.get("limit", limits.PAGE_LIMIT_DEFAULT)
    rows = await s.authorizations(principal(request), card_id, q.get("after"), limit)
    return r.page(rows, limit, "key")


_ALL = (400, 403, 404, 409)

ROUTES = [
    r.Route("POST", "/v1/manager-cards", _post_card,
            "Issue a manager discount card to a staff user of a store (the number is "
            "answered in full this once)", "manager cards", "manager_cards_write", NEW_CARD,
            answers={201: ISSUED}, refusals=_ALL),
    r.Route("GET", "/v1/manager-cards", _list_cards, "List manager cards in scope",
            "manager cards", "loyalty_read", query={**r.PAGE_QUERY, **FILTERS},
            answers={200: r.page_of(CARD)}, refusals=(400, 403)),
    r.Route("GET", "/v1/manager-cards/{card_id}", _get_card, "One manager card",
            "manager cards", "loyalty_read", path_params=CARD_PATH, answers={200: CARD}),
    r.Route("PATCH", "/v1/manager-cards/{card_id}", _patch_card,
            "Disable or enable a manager card, or change its percent, daily total or reasons",
            "manager cards", "manager_cards_write", CHANGES, path_params=CARD_PATH,
            answers={200: CARD}, refusals=_ALL),
    r.Route("POST", "/v1/manager-cards/{card_id}/pin", _set_pin,
            "Set or change a manager card's PIN (unlocks a locked one)", "manager cards",
            "manager_cards_write", PIN, path_params=CARD_PATH, answers={200: CARD},
            refusals=_ALL),
    r.Route("GET", "/v1/manager-cards/{card_id}/authorizations", _authorizations,
            "Every use of a manager card at the POS, approved or refused", "manager cards",
            "audit_read", query=USES_QUERY, path_params=CARD_PATH,
            answers={200: r.page_of(USE)}),
]  # fmt: skip
