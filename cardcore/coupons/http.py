"""Admin routes of e-coupons: campaigns and their figures, codes (generated, imported, issued
to members), one code's lookup, void and signed QR text, and the issuing entities' signing
keys. Every route needs a staff token whose role and scope cover the campaign's place (its
issuing legal entity and, for a store campaign, its store); without a key-encrypting key they
answer 503 `kek_missing` (signing keys are sealed by it).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from cardcore import limits
from cardcore.api import routes as r
from cardcore.api.edge import ApiError
from cardcore.coupons.model import CampaignState, ChangeRule, CodeStatus, CouponKind
from cardcore.coupons.service import CouponService
from cardcore.members.model import ID_MAX
from cardcore.org.http import principal

COUPONS_KEY = web.AppKey("coupons", CouponService)


def coupons(request: web.Request) -> CouponService:
    return r.feature(request, COUPONS_KEY, "coupons")


# --- schemas -------------------------------------------------------------------------------------

TIME_MS = r.TIME_MS
FEN = r.integer(0, limits.AMOUNT_MAX)
COUNT = r.integer(0, 2**62)
CAMPAIGN_CODE = r.string(r.CODE, max_length=32)
NAME = r.NAME
CODES_OF = r.array(r.string(r.CODE, max_length=32), limits.COUPON_STORES_MAX)
CLIENT_KEY = r.string(
    r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}", max_length=limits.COUPON_CLIENT_KEY_CHARS_MAX
)
MEMBER_ID = r.integer(1, ID_MAX)
DEFINITION: dict[str, r.Schema] = {
    "name": NAME,
    "kind": r.enum([k.value for k in CouponKind]),
    "valid_from_ms": TIME_MS,
    "valid_to_ms": TIME_MS,
    "value_fen": FEN,
    "percent_bp": r.integer(0, 2**31),
    "cap_fen": FEN,
    "item_sku": r.string(f"|{r.CODE}", max_length=32),
    "store_share_bp": r.integer(0, 2**31),
    "supplier_share_bp": r.integer(0, 2**31),
    "supplier_id": r.string(f"|{r.CODE}", max_length=32),
    "max_issued": COUNT,
    "max_value_fen": FEN,
    "min_spend_fen": FEN,
    "stores": CODES_OF,
    "departments": CODES_OF,
    "per_member_max": COUNT,
    "per_member_per_day_max": COUNT,
    "holder_only": r.boolean(),
    "stackable": r.boolean(),
    "change_rule": r.enum([c.value for c in ChangeRule]),
    "reward_spend_fen": r.integer(0, limits.POS_AMOUNT_MAX),
    "enrolled_only": r.boolean(),
}
NEW_CAMPAIGN = r.obj(
    {"code": CAMPAIGN_CODE, "legal_entity": r.string(r.CODE), "store": r.string(r.CODE),
     **DEFINITION},
    ["code", "name", "kind", "valid_from_ms", "valid_to_ms"],
)  # fmt: skip
CAMPAIGN_CHANGES = {
    **r.obj({**DEFINITION, "state": r.enum([s.value for s in CampaignState])}),
    "minProperties": 1,
}
_CAMPAIGN_PROPS: dict[str, r.Schema] = {
    "code": CAMPAIGN_CODE,
    "legal_entity": r.string(r.CODE),
    "store": r.string(f"|{r.CODE}"),
    "state": r.enum([s.value for s in CampaignState]),
    **DEFINITION,
    "issued_count": COUNT,
    "issued_value": FEN,
    "redeemed_count": COUNT,
    "redeemed_value": FEN,
    "store_cost_fen": FEN,
    "supplier_cost_fen": FEN,
    "created_at_ms": TIME_MS,
    "updated_at_ms": TIME_MS,
}
CAMPAIGN = r.obj(_CAMPAIGN_PROPS, list(_CAMPAIGN_PROPS))
CAMPAIGN_FILTERS = {
    "state": r.enum([s.value for s in CampaignState]),
    "legal_entity": r.string(r.CODE),
    "store": r.string(r.CODE),
}
FIGURES = r.obj(
    {"campaign": CAMPAIGN_CODE, "issued": COUNT, "redeemed": COUNT, "expired": COUNT,
     "redemption_rate_bp": r.integer(0, 10_000), "store_cost_fen": FEN,
     "supplier_cost_fen": FEN, "cost_fen": FEN, "redeemed_value_fen": FEN},
    ["campaign", "issued", "redeemed", "expired", "redemption_rate_bp", "store_cost_fen",
     "supplier_cost_fen", "cost_fen", "redeemed_value_fen"],
)  # fmt: skip
COUPON_TEXT = r.string(max_length=limits.COUPON_TYPED_CHARS_MAX)
GENERATE = r.obj(
    {"count": r.integer(1, limits.COUPON_GENERATE_ROUTE_MAX), "key": CLIENT_KEY}, ["count"]
)
IMPORT = r.obj(
    {"codes": {**r.array(COUPON_TEXT, limits.COUPON_IMPORT_CODES_MAX), "minItems": 1},
     "key": CLIENT_KEY},
    ["codes"],
)  # fmt: skip
LOCAL_DATE = r.string(r.DATE, max_length=10)
SPEND_SEGMENT = {
    **r.obj(
        {"spend_at_least": r.integer(1, limits.AMOUNT_MAX),
         "program": r.string(r.CODE, max_length=limits.POINTS_CODE_CHARS_MAX),
         "since": LOCAL_DATE, "until": LOCAL_DATE},
        ["spend_at_least", "program", "since", "until"],
    ),
    "description": (
        "Members whose spend (fen) in the points program over its local days since..until "
        f"(both included, at most {limits.COUPON_SEGMENT_DAYS_MAX}) is at least "
        "spend_at_least: purchases that earned points in the program, less returns, over "
        "all of a member's cards"
    ),
}  # fmt: skip
SEGMENT = {
    "oneOf": [
        r.obj({"card_class": r.string(r.CODE, max_length=32)}, ["card_class"]),
        r.obj({"tier": r.string(r.CODE)}, ["tier"]),
        SPEND_SEGMENT,
    ]
}
ISSUE = {
    **r.obj(
        {"member_ids": {**r.array(MEMBER_ID, limits.COUPON_ISSUE_MEMBERS_MAX), "minItems": 1,
                        "uniqueItems": True},
         "segment": SEGMENT, "key": CLIENT_KEY},
    ),
    "minProperties": 1,
}  # fmt: skip
BATCH_PROPS: dict[str, r.Schema] = {
    "campaign": CAMPAIGN_CODE,
    "batch": r.integer(1, 2**62),
    "count": COUNT,
    "source": r.string(max_length=16),
    "replayed": r.boolean(),
}
BATCH_REQUIRED = ["campaign", "batch", "count", "source", "replayed"]
GENERATED = r.obj(
    {**BATCH_PROPS, "codes": r.array(COUPON_TEXT, limits.COUPON_GENERATE_ROUTE_MAX)},
    [*BATCH_REQUIRED, "codes"],
)
HELD = r.obj({"code": COUPON_TEXT, "member_id": r.nullable(MEMBER_ID)}, ["code", "member_id"])
ISSUED = r.obj(
    {**BATCH_PROPS, "codes": r.array(HELD, limits.COUPON_GENERATE_ROUTE_MAX)},
    [*BATCH_REQUIRED, "codes"],
)
_COUPON_PROPS: dict[str, r.Schema] = {
    "code": COUPON_TEXT,
    "display": COUPON_TEXT,
    "campaign": CAMPAIGN_CODE,
    "campaign_state": r.enum([s.value for s in CampaignState]),
    "state": r.enum([s.value for s in CodeStatus]),
    "source": r.string(max_length=16),
    "member_id": r.nullable(MEMBER_ID),
    "valid_from_ms": TIME_MS,
    "valid_to_ms": TIME_MS,
    "reserved_until_ms": r.nullable(TIME_MS),
    "redeemed_at_ms": r.nullable(TIME_MS),
    "issued_at_ms": TIME_MS,
}
COUPON = r.obj(_COUPON_PROPS, list(_COUPON_PROPS))
QR = r.obj(
    {"code": COUPON_TEXT, "qr": r.string(max_length=limits.COUPON_QR_CHARS_MAX),
     "kid": r.string(r.CODE), "expiry_ms": TIME_MS},
    ["code", "qr", "kid", "expiry_ms"],
)  # fmt: skip
NEW_KEY = r.obj({"legal_entity": r.string(r.CODE), "kid": r.string(r.CODE)},
                ["legal_entity", "kid"])  # fmt: skip
KEY = r.obj(
    {"kid": r.string(r.CODE), "legal_entity": r.string(r.CODE),
     "public_hex": r.string("[0-9a-f]{64}"), "state": r.enum(["active", "retired"]),
     "created_at_ms": TIME_MS},
    ["kid", "legal_entity", "public_hex", "state", "created_at_ms"],
)  # fmt: skip
KEY_FILTERS = {"legal_entity": r.string(r.CODE)}

# --- handlers ------------------------------------------------------------------------------------


def _coupon_text(request: web.Request) -> str:
    """The code in the path, as typed (the service forgives case, spaces and hyphens)."""
    raw = request.match_info["code"]
    if not raw or len(raw) > limits.COUPON_TYPED_CHARS_MAX or not raw.isascii():
        raise ApiError(404, "coupon_not_found", "no such coupon", "code")
    return raw


async def _post_campaign(request: web.Request) -> web.Response:
    service = coupons(request)
    b = await r.body(request, NEW_CAMPAIGN)
    return web.json_response(await service.create_campaign(principal(request), b), status=201)


async def _list_campaigns(request: web.Request) -> web.Response:
    service = coupons(request)
    q = r.query(request, {**r.PAGE_QUERY, **CAMPAIGN_FILTERS})
    limit = q.pop("limit", limits.PAGE_LIMIT_DEFAULT)
    after = q.pop("after", None)
    rows = await service.list_campaigns(principal(request), q, after, limit)
    return r.page(rows, limit, "code")


async def _get_campaign(request: web.Request) -> web.Response:
    service = coupons(request)
    code = r.path_code(request, "code")
    return web.json_response(await service.get_campaign(principal(request), code))


async def _patch_campaign(request: web.Request) -> web.Response:
    service = coupons(request)
    code = r.path_code(request, "code")
    b = await r.body(request, CAMPAIGN_CHANGES)
    return web.json_response(await service.update_campaign(principal(request), code, b))


async def _figures(request: web.Request) -> web.Response:
    service = coupons(request)
    code = r.path_code(request, "code")
    return web.json_response(await service.figures(principal(request), code))


CODE_FILTERS = {
    "state": r.enum([s.value for s in CodeStatus if s is not CodeStatus.EXPIRED]),
    "member_id": MEMBER_ID,
    "batch": r.integer(1, limits.RECORD_ID_MAX),
}


async def _list_codes(request: web.Request) -> web.Response:
    service = coupons(request)
    code = r.path_code(request, "code")
    q = r.query(request, {**r.PAGE_QUERY, **CODE_FILTERS})
    limit = q.pop("limit", limits.PAGE_LIMIT_DEFAULT)
    after = q.pop("after", None)
    rows = await service.list_codes(principal(request), code, q, after, limit)
    return r.page(rows, limit, "code")


async def _generate(request: web.Request) -> web.Response:
    service = coupons(request)
    code = r.path_code(request, "code")
    b = await r.body(request, GENERATE)
    codes: list[str] = []
    done = await service.generate(
        principal(request), code, b["count"], key=b.get("key", ""), sink=codes.extend
    )
    answer = {"replayed": False, **done, "codes": codes}
    return web.json_response(answer, status=200 if answer["replayed"] else 201)


async def _import(request: web.Request) -> web.Response:
    service = coupons(request)
    code = r.path_code(request, "code")
    b = await r.body(request, IMPORT)
    p = principal(request)
    done = await service.import_codes(p, code, b["codes"], key=b.get("key", ""))
    return await _batch_answer(service, request, done)


async def _enrol(request: web.Request) -> web.Response:
    service = coupons(request)
    code = r.path_code(request, "code")
    b = await r.body(request, ENROL)
    return web.json_response(await service.enrol(principal(request), code, b["member_ids"]))


async def _enrolments(request: web.Request) -> web.Response:
    service = coupons(request)
    code = r.path_code(request, "code")
    q = r.query(request, r.PAGE_QUERY)
    limit = q.get("limit", limits.PAGE_LIMIT_DEFAULT)
    after = r.cursor_int(q, ID_MAX)
    rows = await service.enrolments(principal(request), code, after, limit)
    return r.page(rows, limit, "member_id")


async def _withdraw(request: web.Request) -> web.Response:
    service = coupons(request)
    code = r.path_code(request, "code")
    member_id = r.path_int(request, "member_id", ID_MAX)
    return web.json_response(await service.withdraw(principal(request), code, member_id))


async def _issue(request: web.Request) -> web.Response:
    service = coupons(request)
    code = r.path_code(request, "code")
    b = await r.body(request, ISSUE)
    if ("member_ids" in b) == ("segment" in b):
        raise ApiError(400, "invalid_value", "give member_ids or a segment", "member_ids")
    done = await service.issue_to_members(
        principal(request), code, member_ids=b.get("member_ids"), segment=b.get("segment"),
        key=b.get("key", ""),
    )  # fmt: skip
    return await _batch_answer(service, request, done)


async def _batch_answer(
    service: CouponService, request: web.Request, done: dict[str, Any]
) -> web.Response:
    codes = await service.batch_codes(principal(request), done["campaign"], done["batch"])
    answer = {"replayed": False, **done, "codes": codes}
    return web.json_response(answer, status=200 if answer["replayed"] else 201)


async def _lookup(request: web.Request) -> web.Response:
    service = coupons(request)
    return web.json_response(await service.lookup(principal(request), _coupon_text(request)))


async def _void(request: web.Request) -> web.Response:
    service = coupons(request)
    return web.json_response(await service.void(principal(request), _coupon_text(request)))


async def _qr(request: web.Request) -> web.Response:
    service = coupons(request)
    return web.json_response(await service.qr(principal(request), _coupon_text(request)))


async def _post_key(request: web.Request) -> web.Response:
    service = coupons(request)
    b = await r.body(request, NEW_KEY)
    view = await service.create_key(principal(request), b["legal_entity"], b["kid"])
    return web.json_response(view, status=201)


async def _list_keys(request: web.Request) -> web.Response:
    service = coupons(request)
    q = r.query(request, {**r.PAGE_QUERY, **KEY_FILTERS})
    limit = q.get("limit", limits.PAGE_LIMIT_DEFAULT)
    rows = await service.list_keys(principal(request), q.get("legal_entity"), q.get("after"),
                                   limit)  # fmt: skip
    return r.page(rows, limit, "kid")


async def _retire_key(request: web.Request) -> web.Response:
    service = coupons(request)
    kid = r.path_code(request, "kid")
    return web.json_response(await service.retire_key(principal(request), kid))


_PAGE = dict(r.PAGE_QUERY)
ENROL = r.obj(
    {"member_ids": {**r.array(MEMBER_ID, limits.COUPON_ISSUE_MEMBERS_MAX), "minItems": 1,
                    "uniqueItems": True}},
    ["member_ids"],
)  # fmt: skip
ENROLLED = r.obj(
    {"campaign": CAMPAIGN_CODE, "enrolled": COUNT, "already": COUNT},
    ["campaign", "enrolled", "already"],
)
ENROLMENT = r.obj({"member_id": MEMBER_ID, "enrolled_at_ms": TIME_MS},
                  ["member_id", "enrolled_at_ms"])  # fmt: skip
WITHDRAWN = r.obj(
    {"campaign": CAMPAIGN_CODE, "member_id": MEMBER_ID, "enrolled": r.boolean()},
    ["campaign", "member_id", "enrolled"],
)
_ALL = (400, 403, 404, 409)
CAMPAIGN_PATH = {"code": CAMPAIGN_CODE}
COUPON_PATH = {"code": COUPON_TEXT}
KID_PATH = {"kid": r.string(r.CODE)}
TAG = "coupons"

ROUTES = [
    r.Route("POST", "/v1/coupon-campaigns", _post_campaign,
            "Define a coupon campaign (a draft): amount off, percent off with a cap, or a gift "
            "item; funding split, budgets, validity, scope, limits", TAG, "campaigns_write",
            NEW_CAMPAIGN, answers={201: CAMPAIGN}, refusals=_ALL),
    r.Route("GET", "/v1/coupon-campaigns", _list_campaigns, "List coupon campaigns in scope",
            TAG, "loyalty_read", query={**_PAGE, **CAMPAIGN_FILTERS},
            answers={200: r.page_of(CAMPAIGN)}, refusals=(400, 403)),
    r.Route("GET", "/v1/coupon-campaigns/{code}", _get_campaign, "One coupon campaign", TAG,
            "loyalty_read", path_params=CAMPAIGN_PATH, answers={200: CAMPAIGN}),
    r.Route("PATCH", "/v1/coupon-campaigns/{code}", _patch_campaign,
            "Change a draft campaign, a live one's name and budgets, or its state (draft -> "
            "active -> paused <-> active, any -> ended)", TAG, "campaigns_write",
            CAMPAIGN_CHANGES, path_params=CAMPAIGN_PATH, answers={200: CAMPAIGN},
            refusals=_ALL),
    r.Route("GET", "/v1/coupon-campaigns/{code}/figures", _figures,
            "A campaign's figures: issued, redeemed, expired, redemption rate, cost by funder",
            TAG, "loyalty_read", path_params=CAMPAIGN_PATH, answers={200: FIGURES}),
    r.Route("GET", "/v1/coupon-campaigns/{code}/codes", _list_codes,
            "List a campaign's codes (filters: state, member, batch; pages by code)", TAG,
            "loyalty_read", query={**_PAGE, **CODE_FILTERS}, path_params=CAMPAIGN_PATH,
            answers={200: r.page_of(COUPON)}),
    r.Route("POST", "/v1/coupon-campaigns/{code}/codes", _generate,
            "Generate bearer codes for printing (random, unique across the group; at most "
            f"{limits.COUPON_GENERATE_ROUTE_MAX}: the CLI makes more), idempotent by key", TAG,
            "campaigns_write", GENERATE, path_params=CAMPAIGN_PATH,
            answers={200: GENERATED, 201: GENERATED}, refusals=_ALL),
    r.Route("POST", "/v1/coupon-campaigns/{code}/imports", _import,
            "Import a partner's codes as they are (all or none), idempotent by key", TAG,
            "campaigns_write", IMPORT, path_params=CAMPAIGN_PATH,
            answers={200: ISSUED, 201: ISSUED}, refusals=_ALL),
    r.Route("POST", "/v1/coupon-campaigns/{code}/issues", _issue,
            "Issue one code to each member of a list or a segment (card class, tier, or "
            "spend in a points program over a period), idempotent by key", TAG,
            "campaigns_write", ISSUE, path_params=CAMPAIGN_PATH,
            answers={200: ISSUED, 201: ISSUED}, refusals=_ALL),
    r.Route("POST", "/v1/coupon-campaigns/{code}/enrolments", _enrol,
            "Enrol members into a campaign (an enrolled_only campaign rewards only them)",
            TAG, "campaigns_write", ENROL, path_params=CAMPAIGN_PATH,
            answers={200: ENROLLED}, refusals=_ALL),
    r.Route("GET", "/v1/coupon-campaigns/{code}/enrolments", _enrolments,
            "List a campaign's enrolled members", TAG, "loyalty_read",
            query=r.PAGE_QUERY, path_params=CAMPAIGN_PATH,
            answers={200: r.page_of(ENROLMENT)}, refusals=_ALL),
    r.Route("DELETE", "/v1/coupon-campaigns/{code}/enrolments/{member_id}", _withdraw,
            "Withdraw a member from a campaign", TAG, "campaigns_write",
            path_params={**CAMPAIGN_PATH, "member_id": MEMBER_ID},
            answers={200: WITHDRAWN}, refusals=_ALL),
    r.Route("GET", "/v1/coupons/{code}", _lookup,
            "Look up a code (typed forgivingly): its state, campaign and validity", TAG,
            "loyalty_read", path_params=COUPON_PATH, answers={200: COUPON}),
    r.Route("POST", "/v1/coupons/{code}/void", _void,
            "Void an issued code (a code held or redeemed at a POS is refused)", TAG,
            "campaigns_write", path_params=COUPON_PATH, answers={200: COUPON},
            refusals=_ALL),
    r.Route("GET", "/v1/coupons/{code}/qr", _qr,
            "The code's signed QR text under its issuing entity's active key", TAG,
            "loyalty_read", path_params=COUPON_PATH, answers={200: QR}, refusals=_ALL),
    r.Route("POST", "/v1/coupon-keys", _post_key,
            "Make a legal entity's Ed25519 signing key for coupon QR texts (the private half "
            "sealed, the public half answered)", TAG, "campaigns_write", NEW_KEY,
            answers={201: KEY}, refusals=_ALL),
    r.Route("GET", "/v1/coupon-keys", _list_keys, "List signing keys (public halves) in scope",
            TAG, "loyalty_read", query={**_PAGE, **KEY_FILTERS},
            answers={200: r.page_of(KEY)}, refusals=(400, 403)),
    r.Route("POST", "/v1/coupon-keys/{kid}/retire", _retire_key,
            "Retire a signing key: it signs nothing more and its QR texts stop verifying",
            TAG, "campaigns_write", path_params=KID_PATH, answers={200: KEY},
            refusals=_ALL),
]  # fmt: skip
