"""Admin routes of card classes, cards, money at the counter, PINs and the breakage report.
Every route needs a staff token whose role and scope cover the card's place (its issuing
legal entity and store); without a key-encrypting key they answer 503 `kek_missing`.

A card number travels only in request bodies (POST /v1/cards/lookup) and in answers to a role
with `cards_pan`, never in a URL; a PIN only in request bodies, never in an answer.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from cardcore import limits
from cardcore.api import routes as r
from cardcore.api.edge import ApiError
from cardcore.cards.model import CardState
from cardcore.cards.service import TENDERS, CardService, CardsUnavailable
from cardcore.ledger import wire
from cardcore.members.model import ID_MAX
from cardcore.org.http import principal

CARDS_KEY = web.AppKey("cards", CardService)


def cards(request: web.Request) -> CardService:
    return r.feature(request, CARDS_KEY, "cards")


_ledger_errors = r.ledger_unavailable_as_503(CardsUnavailable)


# --- schemas -------------------------------------------------------------------------------------

TIME_MS = r.TIME_MS
AMOUNT = r.integer(0, limits.AMOUNT_MAX)
FEN = r.integer(0, limits.POS_AMOUNT_MAX)
CARD_ID = r.integer(1, 2**62)
MEMBER_ID = r.integer(1, ID_MAX)  # members.id is a 32-bit integer
CLASS_CODE = r.string(r.CODE, max_length=32)
NAME = r.NAME
DENOMINATIONS = {
    **r.array(r.integer(1, limits.POS_AMOUNT_MAX), limits.DENOMINATIONS_MAX),
    "uniqueItems": True,
}
CARD_STATE = r.enum([s.value for s in CardState])
CLASS_FIELDS: dict[str, r.Schema] = {
    "name": NAME,
    "denominations": DENOMINATIONS,
    "discount_bp": r.integer(0, limits.DISCOUNT_BP_MAX),
    "points_multiplier_pct": r.integer(0, limits.POINTS_MULTIPLIER_PCT_MAX),
    "issue_fee": FEN,
    "replace_fee": FEN,
    "balance_max": FEN,
    "validity_months": r.integer(0, limits.CARD_VALIDITY_MONTHS_MAX),
    "points_program": r.string(f"|{r.CODE}", max_length=32),  # "" = none
}
CLASS = r.obj(
    {
        "code": CLASS_CODE,
        **CLASS_FIELDS,
        "denominations": r.array(r.integer(1, limits.POS_AMOUNT_MAX), limits.DENOMINATIONS_MAX),
        "named": r.boolean(),
        "gift": r.boolean(),
        "state": r.enum(["active", "retired"]),
        "created_at_ms": TIME_MS,
        "updated_at_ms": TIME_MS,
    },
    ["code", "name", "named", "gift", "denominations", "discount_bp", "points_multiplier_pct",
     "issue_fee", "replace_fee", "balance_max", "validity_months", "points_program", "state",
     "created_at_ms", "updated_at_ms"],
)  # fmt: skip
NEW_CLASS = r.obj(
    {"code": CLASS_CODE, "named": r.boolean(), "gift": r.boolean(), **CLASS_FIELDS},
    ["code", "name", "named"],
)
CLASS_CHANGES = r.obj({**CLASS_FIELDS, "state": r.enum(["active", "retired"])})

_CARD_PROPS: dict[str, r.Schema] = {
    "id": CARD_ID,
    "pan_masked": r.string(max_length=19),
    "class_code": r.string(max_length=32),
    "legal_entity": r.string(max_length=64),
    "store": r.string(max_length=64),
    "member_id": r.nullable(MEMBER_ID),
    "named": r.boolean(),
    "state": CARD_STATE,
    "expires": r.string("|[0-9]{4}", max_length=4),
    "balance_max": AMOUNT,
    "account_id": r.integer(1, 2**62),
    "replaced_by": r.nullable(CARD_ID),
    "has_pin": r.boolean(),
    "pin_failures": r.integer(0, 2**31),
    "created_at_ms": TIME_MS,
    "updated_at_ms": TIME_MS,
}
_CARD_REQUIRED = list(_CARD_PROPS)
CARD = r.obj(_CARD_PROPS, _CARD_REQUIRED)
ISSUED = r.obj({**_CARD_PROPS, "pan": r.string("628888[0-9]{13}", max_length=19)},
               _CARD_REQUIRED)  # fmt: skip
BALANCES = r.obj(
    {"available": AMOUNT, "posted": AMOUNT, "pending": AMOUNT, "incoming": AMOUNT,
     "maximum": AMOUNT},
    ["available", "posted", "pending", "incoming", "maximum"],
)  # fmt: skip
CARD_DETAIL = r.obj(
    {**_CARD_PROPS, "balances": BALANCES, "account_frozen": r.boolean(),
     "discount_bp": r.integer(0, limits.DISCOUNT_BP_MAX)},
    [*_CARD_REQUIRED, "balances", "account_frozen", "discount_bp"],
)  # fmt: skip
REFUND = r.obj(
    {
        "amount": AMOUNT,
        "transfer_ids": r.array(r.integer(1, 2**62), limits.CARD_CLOSE_ATTEMPTS_MAX),
    },
    ["amount", "transfer_ids"],
)
CLOSED = r.obj(
    {**_CARD_PROPS, "refund": REFUND, "points_forfeited": r.integer(0, limits.BALANCE_MAX)},
    [*_CARD_REQUIRED, "refund", "points_forfeited"],
)
NEW_CARD = r.obj(
    {"class_code": CLASS_CODE, "store": r.string(r.CODE), "member_id": MEMBER_ID},
    ["class_code", "store"],
)
NEW_BATCH = r.obj(
    {"class_code": CLASS_CODE, "store": r.string(r.CODE),
     "count": r.integer(1, limits.CARD_ISSUE_BATCH_MAX)},
    ["class_code", "store", "count"],
)  # fmt: skip
BATCH = r.obj(
    {"first_id": CARD_ID, "last_id": CARD_ID, "count": r.integer(1, limits.CARD_ISSUE_BATCH_MAX)},
    ["first_id", "last_id", "count"],
)
RECEIPT = r.string(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,31}", max_length=limits.RECEIPT_CHARS_MAX)
KEY = r.string(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}", max_length=limits.COUNTER_KEY_CHARS_MAX)
PAYMENT = r.obj(
    {"amount": r.integer(1, limits.POS_AMOUNT_MAX), "tender": r.enum(TENDERS),
     "receipt": RECEIPT, "key": KEY, "store": r.string(r.CODE)},
    ["amount", "tender", "receipt", "key"],
)  # fmt: skip
PAID = r.obj(
    {"card_id": CARD_ID, "transfer_id": r.integer(1, 2**62), "amount": FEN,
     "available": AMOUNT, "replayed": r.boolean()},
    ["card_id", "transfer_id", "amount", "available", "replayed"],
)  # fmt: skip
CLOSE = r.obj(
    {"receipt": RECEIPT, "store": r.string(r.CODE), "forfeit_points": r.boolean()}, ["receipt"]
)
PIN = r.obj(
    {"pin": r.string(f"[0-9]{{{limits.PIN_DIGITS_MIN},{limits.PIN_DIGITS_MAX}}}",
                     max_length=limits.PIN_DIGITS_MAX)},
    ["pin"],
)  # fmt: skip
PIN_VERDICT = r.obj(
    {"result": r.enum(["ok", "wrong", "locked", "not_set"]),
     "failures": r.integer(0, 2**31)},
    ["result", "failures"],
)  # fmt: skip
LOOKUP = r.obj({"pan": r.string("[0-9]{12,19}", max_length=19)}, ["pan"])
ENTRY = r.obj(
    {
        "id": r.integer(1, 2**62),
        "transfer_id": r.integer(1, 2**62),
        "kind": r.string(max_length=16),
        "reason": r.string(max_length=limits.REASON_CHARS_MAX),
        "side": r.enum(["debit", "credit"]),
        "posted": r.integer(-(2**63), 2**63 - 1),
        "pending": r.integer(-(2**63), 2**63 - 1),
        "available_after": r.integer(-(2**63), 2**63 - 1),
        "metadata": {"type": "object", "additionalProperties": r.string(max_length=64)},
        "at_ms": TIME_MS,
    },
    ["id", "transfer_id", "kind", "reason", "side", "posted", "pending", "available_after",
     "metadata", "at_ms"],
)  # fmt: skip
_BIG = r.integer(-(2**63), 2**63 - 1)
_NAME = r.string(max_length=limits.NAME_CHARS_MAX)
ACCOUNT_ID = r.integer(1, 2**62)
LEDGER_ACCOUNT = r.obj(
    {
        "id": ACCOUNT_ID, "asset": r.string(max_length=limits.ASSET_CODE_CHARS_MAX),
        "legal_entity": _NAME, "owner_kind": _NAME, "owner_id": _NAME, "purpose": _NAME,
        "flags": r.obj(
            {name: {"type": "boolean"} for name in wire.FLAG_NAMES}, wire.FLAG_NAMES
        ),
        "debits_posted": _BIG, "credits_posted": _BIG, "debits_pending": _BIG,
        "credits_pending": _BIG, "version": _BIG,
    },
    ["id", "asset", "legal_entity", "owner_kind", "owner_id", "purpose", "flags",
     "debits_posted", "credits_posted", "debits_pending", "credits_pending", "version"],
)  # fmt: skip
LEDGER_ENTRY = r.obj(
    {
        "id": ACCOUNT_ID, "seq": ACCOUNT_ID, "transfer_id": ACCOUNT_ID,
        "transfer_kind": r.string(max_length=16), "side": r.enum(["debit", "credit"]),
        "posted_delta": _BIG, "pending_delta": _BIG, "debits_posted": _BIG,
        "credits_posted": _BIG, "debits_pending": _BIG, "credits_pending": _BIG,
        "version": _BIG, "reason": r.string(max_length=limits.REASON_CHARS_MAX),
        "metadata": {"type": "object", "additionalProperties": r.string(max_length=64)},
        "created_at_ms": TIME_MS,
    },
    ["id", "seq", "transfer_id", "transfer_kind", "side", "posted_delta", "pending_delta",
     "debits_posted", "credits_posted", "debits_pending", "credits_pending", "version",
     "reason", "metadata", "created_at_ms"],
)  # fmt: skip
MONTH = r"20[0-9]{2}-(0[1-9]|1[0-2])"  # 2000-2099: card expiries are kept as YYMM
TOTAL = r.obj({"cards": r.integer(0, 2**62), "value": AMOUNT}, ["cards", "value"])
ENTITY_TOTALS = r.obj(
    {"legal_entity": r.string(max_length=64), "gift": TOTAL, "stored_value": TOTAL},
    ["legal_entity", "gift", "stored_value"],
)
BREAKAGE = r.obj(
    {
        "as_of": r.string(MONTH, max_length=7),
        "entities": r.array(ENTITY_TOTALS, limits.PAGE_LIMIT_MAX),
    },
    ["as_of", "entities"],
)
CSV = r.string(max_length=2**31)  # text/csv: card_id,card_number,class_code,expires,face_value

CARD_PATH = {"card_id": CARD_ID}
CLASS_PATH = {"code": CLASS_CODE}
CLASS_FILTERS = {"state": r.enum(["active", "retired"])}
CARD_FILTERS = {
    "member_id": MEMBER_ID,
    "store": r.string(r.CODE),
    "class_code": CLASS_CODE,
    "state": CARD_STATE,
}
EXPORT_QUERY = {"first_id": CARD_ID, "last_id": CARD_ID}
BREAKAGE_QUERY = {"as_of": r.string(MONTH, max_length=7)}

# --- handlers ------------------------------------------------------------------------------------


def _card_id(request: web.Request) -> int:
    return r.path_int(request, "card_id")


def _cursor(q: dict[str, Any]) -> int | None:
    return r.cursor_int(q)


def _required(q: dict[str, Any], name: str) -> Any:
    if name not in q:
        raise ApiError(400, "missing_field", "parameter is required", name)
    return q[name]


async def _post_class(request: web.Request) -> web.Response:
    service = cards(request)
    b = await r.body(request, NEW_CLASS)
    return web.json_response(await service.create_class(principal(request), b), status=201)


async def _list_classes(request: web.Request) -> web.Response:
    service = cards(request)
    q = r.query(request, {**r.PAGE_QUERY, **CLASS_FILTERS})
    limit = q.get("limit", limits.PAGE_LIMIT_DEFAULT)
    rows = await service.list_classes(principal(request), q.get("state"), q.get("after"), limit)
    return r.page(rows, limit, "code")


async def _get_class(request: web.Request) -> web.Response:
    service = cards(request)
    code = r.path_code(request, "code")
    return web.json_response(await service.get_class(principal(request), code))


async def _patch_class(request: web.Request) -> web.Response:
    service = cards(request)
    code = r.path_code(request, "code")
    b = await r.body(request, CLASS_CHANGES)
    return web.json_response(await service.update_class(principal(request), code, b))


async def _post_card(request: web.Request) -> web.Response:
    service = cards(request)
    b = await r.body(request, NEW_CARD)
    view = await service.issue(principal(request), b["class_code"], b["store"], b.get("member_id"))
    return web.json_response(view, status=201)


async def _post_batch(request: web.Request) -> web.Response:
    service = cards(request)
    b = await r.body(request, NEW_BATCH)
    view = await service.issue_batch(principal(request), b["class_code"], b["store"], b["count"])
    return web.json_response(view, status=201)


async def _export(request: web.Request) -> web.Response:
    service = cards(request)
    q = r.query(request, EXPORT_QUERY)
    first, last = _required(q, "first_id"), _required(q, "last_id")
    text = await service.export(principal(request), first, last)
    return web.Response(
        text=text,
        content_type="text/csv",
        headers={"Content-Disposition": f'attachment; filename="cards-{first}-{last}.csv"'},
    )


async def _list_cards(request: web.Request) -> web.Response:
    service = cards(request)
    q = r.query(request, {**r.PAGE_QUERY, **CARD_FILTERS})
    limit = q.pop("limit", limits.PAGE_LIMIT_DEFAULT)
    after = _cursor(q)
    q.pop("after", None)
    rows = await service.list_cards(principal(request), q, after, limit)
    return r.page(rows, limit, "id")


async def _get_card(request: web.Request) -> web.Response:
    service = cards(request)
    return web.json_response(await service.get_card(principal(request), _card_id(request)))


async def _lookup(request: web.Request) -> web.Response:
    service = cards(request)
    b = await r.body(request, LOOKUP)
    return web.json_response(await service.lookup(principal(request), b["pan"]))


async def _journal_page(request: web.Request, of: str) -> web.Response:
    """A page of journal entries, newest first, of the card or account named in the path."""
    service = cards(request)
    read = service.transactions if of == "card_id" else service.ledger_entries
    q = r.query(request, r.PAGE_QUERY)
    limit = q.get("limit", limits.PAGE_LIMIT_DEFAULT)
    rows = await read(principal(request), r.path_int(request, of), _cursor(q), limit)
    return r.page(rows, limit, "id")


async def _transactions(request: web.Request) -> web.Response:
    return await _journal_page(request, "card_id")


async def _ledger_account(request: web.Request) -> web.Response:
    service = cards(request)
    account_id = r.path_int(request, "account_id")
    return web.json_response(await service.ledger_account(principal(request), account_id))


async def _ledger_entries(request: web.Request) -> web.Response:
    return await _journal_page(request, "account_id")


def _state_change(name: str) -> r.Handler:
    async def handler(request: web.Request) -> web.Response:
        service = cards(request)
        card_id = _card_id(request)
        change = getattr(service, name)
        return web.json_response(await change(principal(request), card_id))

    handler.__name__ = f"_post_{name}"
    return handler


async def _replace(request: web.Request) -> web.Response:
    service = cards(request)
    view = await service.replace(principal(request), _card_id(request))
    return web.json_response(view, status=201)


async def _close(request: web.Request) -> web.Response:
    service = cards(request)
    card_id = _card_id(request)
    b = await r.body(request, CLOSE)
    view = await service.close(
        principal(request), card_id, receipt=b["receipt"], store=b.get("store"),
        forfeit_points=b.get("forfeit_points", False),
    )  # fmt: skip
    return web.json_response(view)


async def _topup(request: web.Request) -> web.Response:
    service = cards(request)
    card_id = _card_id(request)
    b = await r.body(request, PAYMENT)
    view = await service.topup(
        principal(request), card_id, amount=b["amount"], tender=b["tender"],
        receipt=b["receipt"], key=b["key"], store=b.get("store"),
    )  # fmt: skip
    return web.json_response(view, status=200 if view["replayed"] else 201)


async def _sell(request: web.Request) -> web.Response:
    service = cards(request)
    card_id = _card_id(request)
    b = await r.body(request, PAYMENT)
    view = await service.sell(
        principal(request), card_id, amount=b["amount"], tender=b["tender"],
        receipt=b["receipt"], key=b["key"], store=b.get("store"),
    )  # fmt: skip
    return web.json_response(view, status=200 if view["replayed"] else 201)


async def _set_pin(request: web.Request) -> web.Response:
    service = cards(request)
    card_id = _card_id(request)
    b = await r.body(request, PIN)
    return web.json_response(await service.set_pin(principal(request), card_id, b["pin"]))


async def _verify_pin(request: web.Request) -> web.Response:
    service = cards(request)
    card_id = _card_id(request)
    b = await r.body(request, PIN)
    return web.json_response(await service.verify_pin(principal(request), card_id, b["pin"]))


async def _unlock_pin(request: web.Request) -> web.Response:
    service = cards(request)
    return web.json_response(await service.unlock_pin(principal(request), _card_id(request)))


async def _breakage(request: web.Request) -> web.Response:
    service = cards(request)
    q = r.query(request, BREAKAGE_QUERY)
    as_of = _required(q, "as_of")
    return web.json_response(await service.breakage(principal(request), as_of))


_PAGE = dict(r.PAGE_QUERY)
_ALL = (400, 403, 404, 409)
_W = _ledger_errors

ROUTES = [
    r.Route("POST", "/v1/card-classes", _W(_post_class),
            "Define a card class (named or bearer, gift, discount, fees, maximum balance)",
            "card classes", "classes_write", NEW_CLASS, answers={201: CLASS},
            refusals=(400, 403, 404, 409)),
    r.Route("GET", "/v1/card-classes", _W(_list_classes), "List card classes", "card classes",
            "classes_read", query={**_PAGE, **CLASS_FILTERS},
            answers={200: r.page_of(CLASS)}, refusals=(400, 403)),
    r.Route("GET", "/v1/card-classes/{code}", _W(_get_class), "One card class",
            "card classes", "classes_read", path_params=CLASS_PATH, answers={200: CLASS}),
    r.Route("PATCH", "/v1/card-classes/{code}", _W(_patch_class),
            "Change a card class (a new maximum balance applies to its cards at once)",
            "card classes", "classes_write", CLASS_CHANGES, path_params=CLASS_PATH,
            answers={200: CLASS}, refusals=_ALL),
    r.Route("POST", "/v1/cards", _W(_post_card),
            "Issue one card (the store needs HQ's grant for the class); the number is "
            "answered in full once, to a role with cards_pan", "cards", "cards_issue",
            NEW_CARD, answers={201: ISSUED}, refusals=_ALL),
    r.Route("GET", "/v1/cards", _W(_list_cards), "List cards (filters, cursor pages)", "cards",
            "cards_read", query={**_PAGE, **CARD_FILTERS}, answers={200: r.page_of(CARD)},
            refusals=(400, 403)),
    r.Route("POST", "/v1/card-batches", _W(_post_batch),
            "Issue a batch of bearer or gift cards for printing (inactive until handed out "
            "or sold)", "cards", "cards_issue", NEW_BATCH, answers={201: BATCH},
            refusals=_ALL),
    r.Route("GET", "/v1/cards/export", _W(_export),
            "Cards first_id..last_id as CSV (text/csv) for printing: full numbers only for "
            "cards_pan", "cards", "cards_read", query=EXPORT_QUERY, answers={200: CSV},
            refusals=(400, 403), media="text/csv"),
    r.Route("POST", "/v1/cards/lookup", _W(_lookup),
            "Find a card by its number (in the body: a number is never in a URL)", "cards",
            "cards_read", LOOKUP, answers={200: CARD_DETAIL}),
    r.Route("GET", "/v1/cards/{card_id}", _W(_get_card),
            "One card with its balances and class discount", "cards", "cards_read",
            path_params=CARD_PATH, answers={200: CARD_DETAIL}),
    r.Route("GET", "/v1/cards/{card_id}/transactions", _W(_transactions),
            "The card's value account journal, newest first", "cards", "cards_read",
            query=_PAGE, path_params=CARD_PATH, answers={200: r.page_of(ENTRY)}),
    r.Route("GET", "/v1/accounts/{account_id}", _W(_ledger_account),
            "A ledger account: flags, balances, version (an entity's; a store's own and its "
            "cards' to the store)", "ledger accounts", "reports_read",
            path_params={"account_id": ACCOUNT_ID}, answers={200: LEDGER_ACCOUNT},
            refusals=(403, 404)),
    r.Route("GET", "/v1/accounts/{account_id}/entries", _W(_ledger_entries),
            "A ledger account's journal entries, newest first, each with the balances after it",
            "ledger accounts", "reports_read", query=_PAGE,
            path_params={"account_id": ACCOUNT_ID}, answers={200: r.page_of(LEDGER_ENTRY)},
            refusals=(400, 403, 404)),
    r.Route("POST", "/v1/cards/{card_id}/activate", _W(_state_change("activate")),
            "Activate an inactive stored-value card (gift cards activate by sale)",
            "card lifecycle", "cards_issue", path_params=CARD_PATH, answers={200: CARD},
            refusals=_ALL),
    r.Route("POST", "/v1/cards/{card_id}/freeze", _W(_state_change("freeze")),
            "Freeze a card (the POS declines it)", "card lifecycle", "cards_state",
            path_params=CARD_PATH, answers={200: CARD}, refusals=_ALL),
    r.Route("POST", "/v1/cards/{card_id}/unfreeze", _W(_state_change("unfreeze")),
            "Unfreeze a frozen card", "card lifecycle", "cards_state", path_params=CARD_PATH,
            answers={200: CARD}, refusals=_ALL),
    r.Route("POST", "/v1/cards/{card_id}/lost", _W(_state_change("report_lost")),
            "Report a card lost (dead for payments until replaced)", "card lifecycle",
            "cards_state", path_params=CARD_PATH, answers={200: CARD}, refusals=_ALL),
    r.Route("POST", "/v1/cards/{card_id}/replace", _W(_replace),
            "Replace a card: a new number sharing the value account (balance and history "
            "carried over exactly); the old card is dead", "card lifecycle", "cards_issue",
            path_params=CARD_PATH, answers={201: ISSUED}, refusals=_ALL),
    r.Route("POST", "/v1/cards/{card_id}/close", _W(_close),
            "Close a card and refund its balance in cash", "card lifecycle", "cards_money",
            CLOSE, path_params=CARD_PATH, answers={200: CLOSED}, refusals=_ALL),
    r.Route("POST", "/v1/cards/{card_id}/topups", _W(_topup),
            "Top up at the counter (cash or bank card, receipt), idempotent by key; never "
            "past the class maximum", "counter", "cards_money", PAYMENT,
            path_params=CARD_PATH, answers={201: PAID, 200: PAID}, refusals=_ALL),
    r.Route("POST", "/v1/cards/{card_id}/sell", _W(_sell),
            "Sell an inactive gift card at one of its denominations (activates it)",
            "counter", "cards_money", PAYMENT, path_params=CARD_PATH,
            answers={201: PAID, 200: PAID}, refusals=_ALL),
    r.Route("POST", "/v1/cards/{card_id}/pin", _W(_set_pin), "Set or change the card's PIN",
            "PINs", "cards_issue", PIN, path_params=CARD_PATH, answers={200: CARD},
            refusals=_ALL),
    r.Route("POST", "/v1/cards/{card_id}/pin/verify", _W(_verify_pin),
            "Check a PIN (wrong PINs count towards the lockout)", "PINs", "cards_state", PIN,
            path_params=CARD_PATH, answers={200: PIN_VERDICT}),
    r.Route("POST", "/v1/cards/{card_id}/pin/unlock", _W(_unlock_pin),
            "Unlock a PIN locked by wrong attempts", "PINs", "cards_state",
            path_params=CARD_PATH, answers={200: CARD}, refusals=_ALL),
    r.Route("GET", "/v1/reports/breakage", _W(_breakage),
            "Value left on expired gift and stored-value cards, per issuing legal entity",
            "reports", "reports_read", query=BREAKAGE_QUERY, answers={200: BREAKAGE},
            refusals=(400, 403)),
]  # fmt: skip
