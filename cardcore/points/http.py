"""Admin routes of the points engine: programs (HQ), earning rules (HQ, or a store's CRM
officer for its own store while HQ grants the store the points function), and a card's
points. Reads need `loyalty_read`; without a key-encrypting key they answer 503
`kek_missing` like the card routes.
"""

from __future__ import annotations

import re

from aiohttp import web

from cardcore import limits
from cardcore.api import routes as r
from cardcore.api.edge import ApiError
from cardcore.org.http import principal
from cardcore.points import model
from cardcore.points.service import PointsService, PointsUnavailable

POINTS_KEY = web.AppKey("points", PointsService)


def points(request: web.Request) -> PointsService:
    return r.feature(request, POINTS_KEY, "points")


_ledger_errors = r.ledger_unavailable_as_503(PointsUnavailable)


# --- schemas ---------------------------------------------------------------------------------

TIME_MS = r.TIME_MS
CODE = r.string(r.CODE, max_length=limits.POINTS_CODE_CHARS_MAX)
NAME = r.NAME
ASSET = r.string(r"[A-Z0-9._:-]{1,32}", max_length=limits.ASSET_CODE_CHARS_MAX)
POINTS = r.integer(0, limits.POINTS_PER_TXN_MAX)
RATE = r.integer(0, limits.POINTS_RATE_MAX)
# Signed points: a balance, and a card's spendable points after a request, go below zero
# under the `negative` policy once a return or a void took back points already spent.
BIG = r.integer(-limits.BALANCE_MAX, limits.BALANCE_MAX)
EXPIRY = r.obj(
    {
        "kind": r.enum([k.value for k in model.ExpiryKind]),
        "months": r.integer(0, limits.POINTS_EXPIRY_MONTHS_MAX),
        "month": r.integer(1, 12),
        "day": r.integer(1, 31),
    },
    ["kind"],
)
TRANSFER = r.obj(
    {
        "allowed": r.boolean(),
        "per_transfer_max_points": POINTS,
        "per_day_max_points": r.integer(0, limits.POINTS_TRANSFER_PER_DAY_MAX),
    },
    ["allowed"],
)
TIER = r.obj(
    {
        "code": CODE,
        "threshold": r.integer(0, limits.BALANCE_MAX),
        "multiplier_pct": r.integer(0, limits.POINTS_MULTIPLIER_PCT_MAX),
    },
    ["code", "threshold", "multiplier_pct"],
)
TIERS = r.nullable(
    r.obj(
        {
            "ladder": r.array(TIER, limits.POINTS_TIERS_MAX),
            "basis": r.enum([b.value for b in model.TierBasis]),
            "period": r.enum([b.value for b in model.TierPeriod]),
            "downgrade": r.enum([b.value for b in model.Downgrade]),
        },
        ["ladder"],
    )
)
PROGRAM_FIELDS: dict[str, r.Schema] = {
    "name": NAME,
    "timezone": r.string(r"[A-Za-z0-9_+/-]{1,64}"),
    "pending_days": r.integer(0, limits.POINTS_PENDING_DAYS_MAX),
    "expiry": EXPIRY,
    "redeem_points": r.integer(1, limits.POINTS_RATE_MAX),
    "redeem_fen": r.integer(1, limits.POINTS_RATE_MAX),
    "negative_policy": r.enum([n.value for n in model.NegativePolicy]),
    "transfer": TRANSFER,
    "tiers": TIERS,
}
NEW_PROGRAM = r.obj({"code": CODE, "asset": ASSET, **PROGRAM_FIELDS}, ["code", "name", "asset"])
PROGRAM_CHANGES = {
    **r.obj({**PROGRAM_FIELDS, "state": r.enum(["active", "closed"])}),
    "minProperties": 1,
}
PROGRAM = r.obj(
    {
        "code": CODE,
        "asset": ASSET,
        **PROGRAM_FIELDS,
        "state": r.enum(["active", "closed"]),
        "created_at_ms": TIME_MS,
        "updated_at_ms": TIME_MS,
    },
    ["code", "asset", "name", "timezone", "pending_days", "expiry", "redeem_points",
     "redeem_fen", "negative_policy", "transfer", "tiers", "state", "created_at_ms",
     "updated_at_ms"],
)  # fmt: skip
HHMM = r.string(r"[0-9]{2}:[0-9]{2}", max_length=5)
NAMES = {
    **r.array(r.string(max_length=limits.NAME_CHARS_MAX), limits.POINTS_RULE_SET_ITEMS_MAX),
    "uniqueItems": True,
}
RULE_FIELDS: dict[str, r.Schema] = {
    "priority": r.integer(0, limits.POINTS_PRIORITY_MAX),
    "points": RATE,
    "per_fen": RATE,
    "bonus_pct": r.integer(0, limits.POINTS_BONUS_PCT_MAX),
    "departments": NAMES,
    "categories": NAMES,
    "min_spend_fen": r.integer(0, limits.POS_AMOUNT_MAX),
    "cap_per_txn_points": r.nullable(POINTS),
    "cap_per_day_points": r.nullable(POINTS),
    "valid_from": r.nullable(r.string(r.DATE, max_length=10)),
    "valid_to": r.nullable(r.string(r.DATE, max_length=10)),
    "window": r.nullable({**r.array(HHMM, 2), "minItems": 2}),
    "weekdays": {**r.array(r.integer(1, 7), 7), "uniqueItems": True},
    "stores": NAMES,
    "stackable": r.boolean(),
    "card_class_multiplier": r.boolean(),
    "tier_multiplier": r.boolean(),
}
RULE_KIND = r.enum([k.value for k in model.RuleKind])
NEW_RULE = r.obj(
    {"code": CODE, "kind": RULE_KIND, "legal_entity": CODE, "store": CODE, **RULE_FIELDS},
    ["code", "kind"],
)
RULE_CHANGES = {
    **r.obj({**RULE_FIELDS, "kind": RULE_KIND, "state": r.enum(["active", "retired"])}),
    "minProperties": 1,
}
RULE = r.obj(
    {
        "code": CODE,
        "kind": RULE_KIND,
        "program": CODE,
        "legal_entity": r.string(max_length=64),
        "store": r.string(max_length=64),
        **RULE_FIELDS,
        "state": r.enum(["active", "retired"]),
        "created_at_ms": TIME_MS,
        "updated_at_ms": TIME_MS,
    },
    ["code", "kind", "program", "legal_entity", "store", "state", "created_at_ms",
     "updated_at_ms"],
)  # fmt: skip
LOT = r.obj(
    {
        "lot": r.string(max_length=64),
        "remaining": r.integer(0, limits.BALANCE_MAX),
        "expires_on": r.nullable(r.string(r.DATE, max_length=10)),
        "usable_from": r.nullable(r.string(r.DATE, max_length=10)),
        "expires_at_ms": r.nullable(TIME_MS),
        "available_at_ms": TIME_MS,
    },
    ["lot", "remaining", "expires_on", "usable_from", "expires_at_ms", "available_at_ms"],
)
CARD_POINTS = r.obj(
    {
        "card_id": r.integer(1, 2**62),
        "program": r.nullable(CODE),
        "balance": BIG,
        "usable": r.integer(0, limits.BALANCE_MAX),
        "pending": r.integer(0, limits.BALANCE_MAX),
        "debt": r.integer(0, limits.BALANCE_MAX),
        "tier": r.nullable(CODE),
        "lots": r.array(LOT, limits.POINTS_OPEN_LOTS_MAX),
    },
    ["card_id", "program", "balance", "usable", "pending", "debt", "tier", "lots"],
)
HISTORY_LINE = r.obj(
    {
        "id": r.integer(1, 2**62),
        "transfer_id": r.integer(1, 2**62),
        "reason": r.string(max_length=limits.REASON_CHARS_MAX),
        "account": r.string(max_length=64),
        "points": BIG,
        "at_ms": TIME_MS,
    },
    ["id", "transfer_id", "reason", "account", "points", "at_ms"],
)
KEY_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}"
CLIENT_KEY = r.string(KEY_PATTERN, max_length=64)
REWARD = r.string(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,63}", max_length=64)
SPEND = r.integer(1, limits.POINTS_PER_TXN_MAX)
CAMPAIGN = r.string(r.CODE, max_length=32)  # a coupon campaign's code
COUPON = r.nullable(r.string(max_length=40))  # the code a redemption issued, or null
NEW_REDEMPTION = r.obj({"points": SPEND, "reward": REWARD, "key": CLIENT_KEY,
                        "coupon_campaign": CAMPAIGN},
                       ["points", "reward", "key"])  # fmt: skip
REDEMPTION = r.obj(
    {"key": CLIENT_KEY, "card_id": r.integer(1, 2**62), "points": SPEND, "reward": REWARD,
     "coupon_campaign": r.nullable(CAMPAIGN), "coupon": COUPON,
     "transfer_id": r.nullable(r.integer(1, 2**62)), "replayed": r.boolean(),
     "points_balance": BIG},
    ["key", "card_id", "points", "reward", "coupon_campaign", "coupon", "transfer_id",
     "replayed", "points_balance"],
)  # fmt: skip
REDEMPTION_REVERSED = r.obj(
    {"key": CLIENT_KEY, "card_id": r.integer(1, 2**62), "points": SPEND,
     "reversed": r.boolean(), "coupon": COUPON, "transfer_id": r.nullable(r.integer(1, 2**62)),
     "replayed": r.boolean(), "points_balance": BIG},
    ["key", "card_id", "points", "reversed", "coupon", "transfer_id", "replayed",
     "points_balance"],
)  # fmt: skip
NEW_TRANSFER = r.obj({"to_card_id": r.integer(1, 2**62), "points": SPEND, "key": CLIENT_KEY},
                     ["to_card_id", "points", "key"])  # fmt: skip
TRANSFERRED = r.obj(
    {"key": CLIENT_KEY, "card_id": r.integer(1, 2**62), "to_card_id": r.integer(1, 2**62),
     "points": SPEND, "transfer_id": r.nullable(r.integer(1, 2**62)),
     "replayed": r.boolean(), "points_balance": BIG},
    ["key", "card_id", "to_card_id", "points", "transfer_id", "replayed", "points_balance"],
)  # fmt: skip
SUMS = r.obj(
    {"program": CODE, "balance": BIG, "usable": r.integer(0, limits.BALANCE_MAX),
     "pending": r.integer(0, limits.BALANCE_MAX), "debt": r.integer(0, limits.BALANCE_MAX)},
    ["program", "balance", "usable", "pending", "debt"],
)  # fmt: skip
MEMBER_POINTS = r.obj(
    {"member_id": r.integer(1, 2**31 - 1), "programs": r.array(SUMS),
     "cards": r.array(CARD_POINTS)},
    ["member_id", "programs", "cards"],
)  # fmt: skip
PROGRAM_PATH = {"code": CODE}
RULE_PATH = {"code": CODE, "rule": CODE}
CARD_PATH = {"card_id": r.integer(1, 2**62)}
MEMBER_PATH = {"member_id": r.integer(1, 2**31 - 1)}
REDEMPTION_PATH = {"card_id": r.integer(1, 2**62), "key": CLIENT_KEY}
STATE_FILTER = {"state": r.enum(["active", "closed"])}

# --- handlers --------------------------------------------------------------------------------


async def _post_program(request: web.Request) -> web.Response:
    service = points(request)
    b = await r.body(request, NEW_PROGRAM)
    return web.json_response(await service.create_program(principal(request), b), status=201)


async def _list_programs(request: web.Request) -> web.Response:
    service = points(request)
    q = r.query(request, {**r.PAGE_QUERY, **STATE_FILTER})
    limit = q.get("limit", limits.PAGE_LIMIT_DEFAULT)
    rows = await service.list_programs(principal(request), q.get("state"), q.get("after"), limit)
    return r.page(rows, limit, "code")


async def _get_program(request: web.Request) -> web.Response:
    service = points(request)
    code = r.path_code(request, "code")
    return web.json_response(await service.get_program(principal(request), code))


async def _patch_program(request: web.Request) -> web.Response:
    service = points(request)
    code = r.path_code(request, "code")
    b = await r.body(request, PROGRAM_CHANGES)
    return web.json_response(await service.update_program(principal(request), code, b))


async def _post_rule(request: web.Request) -> web.Response:
    service = points(request)
    code = r.path_code(request, "code")
    b = await r.body(request, NEW_RULE)
    return web.json_response(await service.create_rule(principal(request), code, b), status=201)


async def _list_rules(request: web.Request) -> web.Response:
    service = points(request)
    code = r.path_code(request, "code")
    q = r.query(request, r.PAGE_QUERY)
    limit = q.get("limit", limits.PAGE_LIMIT_DEFAULT)
    rows = await service.list_rules(principal(request), code, q.get("after"), limit)
    return r.page(rows, limit, "code")


async def _get_rule(request: web.Request) -> web.Response:
    service = points(request)
    code, rule = r.path_code(request, "code"), r.path_code(request, "rule")
    return web.json_response(await service.get_rule(principal(request), code, rule))


async def _patch_rule(request: web.Request) -> web.Response:
    service = points(request)
    code, rule = r.path_code(request, "code"), r.path_code(request, "rule")
    b = await r.body(request, RULE_CHANGES)
    return web.json_response(await service.update_rule(principal(request), code, rule, b))


async def _card_points(request: web.Request) -> web.Response:
    service = points(request)
    card_id = r.path_int(request, "card_id")
    return web.json_response(await service.card_points(principal(request), card_id))


async def _points_history(request: web.Request) -> web.Response:
    service = points(request)
    card_id = r.path_int(request, "card_id")
    q = r.query(request, r.PAGE_QUERY)
    limit = q.get("limit", limits.PAGE_LIMIT_DEFAULT)
    rows = await service.points_history(principal(request), card_id, r.cursor_int(q), limit)
    return r.page(rows, limit, "id")


async def _post_redemption(request: web.Request) -> web.Response:
    service = points(request)
    card_id = r.path_int(request, "card_id")
    b = await r.body(request, NEW_REDEMPTION)
    view = await service.redeem_reward(
        principal(request), card_id, points=b["points"], reward=b["reward"], key=b["key"],
        coupon_campaign=b.get("coupon_campaign", ""),
    )  # fmt: skip
    return web.json_response(view, status=200 if view["replayed"] else 201)


async def _post_redemption_reversal(request: web.Request) -> web.Response:
    service = points(request)
    card_id = r.path_int(request, "card_id")
    key = request.match_info["key"]
    if not re.fullmatch(KEY_PATTERN, key):
        raise ApiError(404, "redemption_not_found", "no such redemption", "key")
    return web.json_response(await service.reverse_reward(principal(request), card_id, key))


async def _post_transfer(request: web.Request) -> web.Response:
    service = points(request)
    card_id = r.path_int(request, "card_id")
    b = await r.body(request, NEW_TRANSFER)
    view = await service.transfer(
        principal(request), card_id, to_card_id=b["to_card_id"], points=b["points"],
        key=b["key"],
    )  # fmt: skip
    return web.json_response(view, status=200 if view["replayed"] else 201)


async def _member_points(request: web.Request) -> web.Response:
    service = points(request)
    member_id = r.path_int(request, "member_id", 2**31 - 1)
    return web.json_response(await service.member_points(principal(request), member_id))


_PAGE = dict(r.PAGE_QUERY)
_ALL = (400, 403, 404, 409)
_W = _ledger_errors

ROUTES = [
    r.Route("POST", "/v1/points/programs", _W(_post_program),
            "Define a points program (its ledger asset, time zone, return window, expiry, "
            "redemption rate, policies, tiers)", "points", "programs_write", NEW_PROGRAM,
            answers={201: PROGRAM}, refusals=(400, 403, 409)),
    r.Route("GET", "/v1/points/programs", _W(_list_programs), "List points programs",
            "points", "loyalty_read", query={**_PAGE, **STATE_FILTER},
            answers={200: r.page_of(PROGRAM)}, refusals=(400, 403)),
    r.Route("GET", "/v1/points/programs/{code}", _W(_get_program), "One points program",
            "points", "loyalty_read", path_params=PROGRAM_PATH, answers={200: PROGRAM}),
    r.Route("PATCH", "/v1/points/programs/{code}", _W(_patch_program),
            "Change a program's name, state, definition or tiers (never its code or asset)",
            "points", "programs_write", PROGRAM_CHANGES, path_params=PROGRAM_PATH,
            answers={200: PROGRAM}, refusals=_ALL),
    r.Route("POST", "/v1/points/programs/{code}/rules", _W(_post_rule),
            "Define an earning rule: the group's, an entity's, or one store's (a store CRM "
            "officer: its own store, while HQ grants it the points function)", "points",
            "rules_write", NEW_RULE, path_params=PROGRAM_PATH, answers={201: RULE},
            refusals=_ALL),
    r.Route("GET", "/v1/points/programs/{code}/rules", _W(_list_rules),
            "List a program's earning rules visible in the token's scope", "points",
            "loyalty_read", query=_PAGE, path_params=PROGRAM_PATH,
            answers={200: r.page_of(RULE)}),
    r.Route("GET", "/v1/points/programs/{code}/rules/{rule}", _W(_get_rule),
            "One earning rule", "points", "loyalty_read", path_params=RULE_PATH,
            answers={200: RULE}),
    r.Route("PATCH", "/v1/points/programs/{code}/rules/{rule}", _W(_patch_rule),
            "Change or retire an earning rule (same scope as defining it)", "points",
            "rules_write", RULE_CHANGES, path_params=RULE_PATH, answers={200: RULE},
            refusals=_ALL),
    r.Route("GET", "/v1/cards/{card_id}/points", _W(_card_points),
            "A card's points: balance, usable, pending, debt, tier and lots with their "
            "expiry", "points", "loyalty_read", path_params=CARD_PATH,
            answers={200: CARD_POINTS}),
    r.Route("GET", "/v1/cards/{card_id}/points/history", _W(_points_history),
            "The card's points journal, newest first: what each earning, spend, clawback, "
            "expiry and reversal moved in which lot (or the debt)", "points", "loyalty_read",
            query=_PAGE, path_params=CARD_PATH, answers={200: r.page_of(HISTORY_LINE)}),
    r.Route("GET", "/v1/members/{member_id}/points", _W(_member_points),
            "A member's points: each live card's, and the sums per program", "points",
            "loyalty_read", path_params=MEMBER_PATH, answers={200: MEMBER_POINTS}),
    r.Route("POST", "/v1/cards/{card_id}/points/redemptions", _W(_post_redemption),
            "Spend a card's points for a reward (coupon, gift card, goods), earliest expiry "
            "first; idempotent by key", "points", "points_write", NEW_REDEMPTION,
            path_params=CARD_PATH, answers={201: REDEMPTION, 200: REDEMPTION}, refusals=_ALL),
    r.Route("POST", "/v1/cards/{card_id}/points/redemptions/{key}/reversal",
            _W(_post_redemption_reversal),
            "Undo a reward redemption: its points back into exactly the lots they came from, "
            "once", "points", "points_write", path_params=REDEMPTION_PATH,
            answers={200: REDEMPTION_REVERSED}, refusals=_ALL),
    r.Route("POST", "/v1/cards/{card_id}/points/transfers", _W(_post_transfer),
            "Give points to another member's card in the same program, within the program's "
            "transfer policy; idempotent by key", "points", "points_write", NEW_TRANSFER,
            path_params=CARD_PATH, answers={201: TRANSFERRED, 200: TRANSFERRED},
            refusals=_ALL),
]  # fmt: skip
