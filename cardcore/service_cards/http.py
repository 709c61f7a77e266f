"""Admin routes of service cards: products (HQ), packages sold onto a card at the counter,
a card's packages, refunds of unused entitlements. Without a key-encrypting key they answer
503 `kek_missing`; a ledger that cannot take a step now answers 503 `ledger_unavailable`.
"""

from __future__ import annotations

from aiohttp import web

from cardcore import limits
from cardcore.api import routes as r
from cardcore.cards.service import TENDERS
from cardcore.org.http import principal
from cardcore.service_cards.model import EntitlementState, RefundPolicy
from cardcore.service_cards.service import ServiceCards, ServicesUnavailable

SERVICE_CARDS_KEY = web.AppKey("service_cards", ServiceCards)


def service(request: web.Request) -> ServiceCards:
    return r.feature(request, SERVICE_CARDS_KEY, "service cards")


_ledger_errors = r.ledger_unavailable_as_503(ServicesUnavailable)


# --- schemas -------------------------------------------------------------------------------------

TIME_MS = r.TIME_MS
ID = r.integer(1, limits.RECORD_ID_MAX)
CODE = r.string(r.CODE, max_length=32)
NAME = r.string(
    r"[^\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]{1,64}",
    max_length=limits.SERVICE_NAME_CHARS_MAX,
)
FEN = r.integer(0, limits.SERVICE_PRICE_FEN_MAX)
PRICE = r.integer(1, limits.SERVICE_PRICE_FEN_MAX)  # a sale moves it: never 0
STORES = {**r.array(CODE, limits.SERVICE_STORES_MAX), "uniqueItems": True}
POLICY = r.enum([x.value for x in RefundPolicy])
STATE = r.enum(["active", "retired"])
TERMS: dict[str, r.Schema] = {
    "name": NAME,
    "uses": r.integer(1, limits.SERVICE_USES_MAX),
    "price_fen": PRICE,
    "validity_months": r.integer(1, limits.SERVICE_VALIDITY_MONTHS_MAX),
    "stores": STORES,
    "refund_policy": POLICY,
    "refund_fee_fen": FEN,
    "single_use_price_fen": FEN,
    "refund_after_expiry": r.boolean(),
}
NEW_PRODUCT = r.obj(
    {"code": CODE, "legal_entity": CODE, **TERMS},
    ["code", "name", "legal_entity", "uses", "price_fen", "validity_months"],
)
PRODUCT_CHANGES = {**r.obj({**TERMS, "state": STATE}), "minProperties": 1}
PRODUCT = r.obj(
    {"code": CODE, "legal_entity": CODE, **TERMS, "state": STATE, "created_at_ms": TIME_MS,
     "updated_at_ms": TIME_MS},
    ["code", "name", "legal_entity", "uses", "price_fen", "validity_months", "stores",
     "refund_policy", "refund_fee_fen", "single_use_price_fen", "refund_after_expiry", "state",
     "created_at_ms", "updated_at_ms"],
)  # fmt: skip
_PACKAGE_PROPS: dict[str, r.Schema] = {
    "id": ID,
    "card_id": r.integer(1, 2**62),
    "product": CODE,
    "holder": r.integer(1, 2**62),
    "member_id": r.nullable(ID),
    "store": CODE,
    "uses_total": r.integer(1, limits.SERVICE_USES_MAX),
    "uses_left": r.integer(0, limits.SERVICE_USES_MAX),
    "price_fen": PRICE,
    "refund_policy": POLICY,  # the refund terms of the sale (the product's that day)
    "refund_fee_fen": FEN,
    "single_use_price_fen": FEN,
    "refund_after_expiry": r.boolean(),
    "stores": STORES,  # where it may be redeemed: the product's stores of the sale, [] = all
    "sold_ms": TIME_MS,
    "expires_ms": TIME_MS,
    "state": r.enum([x.value for x in EntitlementState]),
    "refunded_fen": FEN,
    "updated_at_ms": TIME_MS,
}
PACKAGE = r.obj(_PACKAGE_PROPS, list(_PACKAGE_PROPS))
RECEIPT = r.string(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,31}", max_length=limits.RECEIPT_CHARS_MAX)
KEY = r.string(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}", max_length=limits.COUNTER_KEY_CHARS_MAX)
SALE = r.obj(
    {"product": CODE, "tender": r.enum(TENDERS), "receipt": RECEIPT, "key": KEY,
     "store": r.string(r.CODE)},
    ["product", "tender", "key"],
)  # fmt: skip
SOLD = r.obj(
    {**_PACKAGE_PROPS, "transfer_id": r.nullable(r.integer(1, 2**62)), "replayed": r.boolean()},
    [*_PACKAGE_PROPS, "transfer_id", "replayed"],
)
PACKAGES = r.obj({"items": r.array(PACKAGE, limits.SERVICE_ENTITLEMENTS_PER_CARD_MAX)}, ["items"])
REFUND = r.obj({"key": KEY, "receipt": RECEIPT}, ["key"])
_REFUNDED_PROPS = {k: v for k, v in _PACKAGE_PROPS.items() if k != "card_id"}
REFUNDED = r.obj(
    {**_REFUNDED_PROPS, "refund_fen": FEN, "transfer_id": r.nullable(r.integer(1, 2**62)),
     "replayed": r.boolean()},
    [*_REFUNDED_PROPS, "refund_fen", "transfer_id", "replayed"],
)  # fmt: skip
PRODUCT_FILTERS = {"legal_entity": CODE, "state": STATE}
CODE_PATH = {"code": CODE}
CARD_PATH = {"card_id": r.integer(1, 2**62)}
PACKAGE_PATH = {"package_id": ID}

# --- handlers ------------------------------------------------------------------------------------


async def _post_product(request: web.Request) -> web.Response:
    s = service(request)
    b = await r.body(request, NEW_PRODUCT)
    return web.json_response(await s.create_product(principal(request), b), status=201)


async def _list_products(request: web.Request) -> web.Response:
    s = service(request)
    q = r.query(request, {**r.PAGE_QUERY, **PRODUCT_FILTERS})
    limit = q.pop("limit", limits.PAGE_LIMIT_DEFAULT)
    after = q.pop("after", None)
    rows = await s.list_products(principal(request), q, after, limit)
    return r.page(rows, limit, "code")


async def _get_product(request: web.Request) -> web.Response:
    s = service(request)
    code = r.path_code(request, "code")
    return web.json_response(await s.get_product(principal(request), code))


async def _patch_product(request: web.Request) -> web.Response:
    s = service(request)
    code = r.path_code(request, "code")
    b = await r.body(request, PRODUCT_CHANGES)
    return web.json_response(await s.update_product(principal(request), code, b))


async def _sell(request: web.Request) -> web.Response:
    s = service(request)
    card_id = r.path_int(request, "card_id")
    b = await r.body(request, SALE)
    view = await s.sell(
        principal(request), card_id, product_code=b["product"], tender=b["tender"],
        receipt=b.get("receipt", ""), key=b["key"], store=b.get("store"),
    )  # fmt: skip
    return web.json_response(view, status=200 if view["replayed"] else 201)


async def _list_packages(request: web.Request) -> web.Response:
    s = service(request)
    card_id = r.path_int(request, "card_id")
    return web.json_response({"items": await s.list_packages(principal(request), card_id)})


async def _refund(request: web.Request) -> web.Response:
    s = service(request)
    package_id = r.path_int(request, "package_id", limits.RECORD_ID_MAX)
    b = await r.body(request, REFUND)
    view = await s.refund(
        principal(request), package_id, key=b["key"], receipt=b.get("receipt", "")
    )
    return web.json_response(view)


_PAGE = dict(r.PAGE_QUERY)
_ALL = (400, 403, 404, 409)
_W = _ledger_errors

ROUTES = [
    r.Route("POST", "/v1/service-products", _W(_post_product),
            "Define a service product (uses, price, validity, stores, refund policy)",
            "service cards", "programs_write", NEW_PRODUCT, answers={201: PRODUCT},
            refusals=_ALL),
    r.Route("GET", "/v1/service-products", _W(_list_products),
            "List service products of the legal entities in scope", "service cards",
            "loyalty_read", query={**_PAGE, **PRODUCT_FILTERS},
            answers={200: r.page_of(PRODUCT)}, refusals=(400, 403)),
    r.Route("GET", "/v1/service-products/{code}", _W(_get_product), "One service product",
            "service cards", "loyalty_read", path_params=CODE_PATH, answers={200: PRODUCT}),
    r.Route("PATCH", "/v1/service-products/{code}", _W(_patch_product),
            "Change a service product or retire it (later sales use the new terms)",
            "service cards", "programs_write", PRODUCT_CHANGES, path_params=CODE_PATH,
            answers={200: PRODUCT}, refusals=_ALL),
    r.Route("POST", "/v1/cards/{card_id}/service-packages", _W(_sell),
            "Sell a service package onto a card at the counter (cash or bank card), "
            "idempotent by key", "service cards", "services_sell", SALE,
            path_params=CARD_PATH, answers={201: SOLD, 200: SOLD}, refusals=_ALL),
    r.Route("GET", "/v1/cards/{card_id}/service-packages", _W(_list_packages),
            "The service packages on a card, newest first", "service cards", "loyalty_read",
            path_params=CARD_PATH, answers={200: PACKAGES}),
    r.Route("POST", "/v1/service-packages/{package_id}/refund", _W(_refund),
            "Refund a package's unused entitlements by the refund terms of its sale, "
            "idempotent by key", "service cards", "services_sell", REFUND, path_params=PACKAGE_PATH,
            answers={200: REFUNDED}, refusals=_ALL),
]  # fmt: skip
