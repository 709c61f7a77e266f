"""Admin routes of members: register, read, list, look up by ID document, change, SMS consent,
merge a duplicate, delete. Every route needs a staff token with a members permission in the
member's scope; without a key-encrypting key (no vault for ID numbers) they answer 503
`kek_missing`.

An ID number travels only in request bodies (POST /v1/members/lookup), never in a URL: access
logs record URLs. Answers show its mask.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from cardcore import limits
from cardcore.api import routes as r
from cardcore.api.edge import ApiError
from cardcore.members.model import GENDERS, ID_MAX, IdType, MemberState, Purpose
from cardcore.members.service import MemberService
from cardcore.org.http import principal

MEMBERS_KEY = web.AppKey("members", MemberService)


def members(request: web.Request) -> MemberService:
    return r.feature(request, MEMBERS_KEY, "members")


# --- schemas -------------------------------------------------------------------------------------

# Printable text: no control characters, line separators or lone surrogates (not UTF-8).
_TEXT = r"[^\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]"
_EMAIL_PART = r"[^@\s\x00-\x1f\x7f-\x9f\ud800-\udfff]"
MEMBER_ID = r.integer(1, ID_MAX)
NAME = r.string(f"{_TEXT}{{1,{limits.MEMBER_NAME_CHARS_MAX}}}",
                max_length=limits.MEMBER_NAME_CHARS_MAX)  # fmt: skip
EMAIL = r.string(f"|{_EMAIL_PART}+@{_EMAIL_PART}+\\.{_EMAIL_PART}+",
                 max_length=limits.EMAIL_CHARS_MAX)  # fmt: skip
# Any spelling, long or not: the member rules answer invalid_mobile, invalid_birthday and
# invalid_id_number for what they refuse, as docs/members.md says.
MOBILE = r.string(max_length=limits.MEMBER_TYPED_CHARS_MAX)
GENDER = r.enum(GENDERS)
BIRTHDAY = r.string(max_length=limits.MEMBER_TYPED_CHARS_MAX)
TIER = r.string(f"|{r.CODE}", max_length=32)
ID_TYPE = r.enum([t.value for t in IdType])
ID_NUMBER = r.string(max_length=limits.MEMBER_TYPED_CHARS_MAX)  # checked per type
SOURCE = r.string(r"[a-z][a-z0-9_]{0,31}", max_length=32)  # counter, sms, app, import, ...
PURPOSE = r.enum([x.value for x in Purpose])
STATE = r.enum([x.value for x in MemberState])
TIME_MS = r.TIME_MS

CARD = r.obj(
    {
        "id": r.integer(0, 2**63 - 1),
        "pan_masked": r.string(max_length=19),
        "class_code": r.string(max_length=32),
        "state": r.string(max_length=16),
    },
    ["id", "pan_masked", "class_code", "state"],
)
_FIELDS: dict[str, r.Schema] = {
    "id": MEMBER_ID,
    "mobile": r.nullable(r.string(max_length=20)),
    "name": r.string(max_length=limits.MEMBER_NAME_CHARS_MAX),
    "gender": GENDER,
    "birthday": BIRTHDAY,
    "id_type": r.enum(["", *(t.value for t in IdType)]),
    "id_masked": r.string(max_length=32),
    "email": r.string(max_length=limits.EMAIL_CHARS_MAX),
    "sms_alerts": r.boolean(),
    "sms_marketing": r.boolean(),
    "tier": r.string(max_length=32),
    "home_store": r.string(max_length=32),
    "legal_entity": r.string(max_length=32),
    "state": STATE,
    "merged_into": r.nullable(MEMBER_ID),
    "created_at_ms": TIME_MS,
    "updated_at_ms": TIME_MS,
}
MEMBER_SUMMARY = r.obj(_FIELDS, list(_FIELDS))
MEMBER = r.obj(
    {
        **_FIELDS,
        "cards": r.array(CARD, limits.MEMBER_CARDS_SHOWN_MAX),
        "cards_more": r.boolean(),
    },
    [*_FIELDS, "cards", "cards_more"],
)
CONSENT = r.obj(
    {
        "id": r.integer(1, ID_MAX),
        "member_id": MEMBER_ID,
        "purpose": PURPOSE,
        "granted": r.boolean(),
        "source": r.string(max_length=32),
        "at_ms": TIME_MS,
        "user_id": r.integer(0, ID_MAX),
    },
    ["id", "member_id", "purpose", "granted", "source", "at_ms", "user_id"],
)

NEW_MEMBER = r.obj(
    {
        "mobile": MOBILE,
        "name": NAME,
        "gender": GENDER,
        "birthday": BIRTHDAY,
        "email": EMAIL,
        "tier": TIER,
        "home_store": r.string(r.CODE),
        "id_type": ID_TYPE,
        "id_number": ID_NUMBER,
        "sms_alerts": r.boolean(),
        "sms_marketing": r.boolean(),
        "consent_source": SOURCE,
    },
    ["mobile", "name", "home_store"],
    closed=True,
)
MEMBER_CHANGES = r.obj(
    {
        "mobile": MOBILE,
        "name": NAME,
        "gender": GENDER,
        "birthday": BIRTHDAY,
        "email": EMAIL,
        "tier": TIER,
        "home_store": r.string(r.CODE),
        "id_type": ID_TYPE,
        "id_number": ID_NUMBER,
    },
    closed=True,
)
LOOKUP = r.obj(
    {
        "id_type": ID_TYPE,
        "id_number": ID_NUMBER,
        "limit": r.integer(1, limits.PAGE_LIMIT_MAX),
        "after": r.string(r"[0-9]{1,10}"),  # `next_after` as answered: a string
    },
    ["id_type", "id_number"],
    closed=True,
)
NEW_CONSENT = r.obj(
    {"purpose": PURPOSE, "granted": r.boolean(), "source": SOURCE},
    ["purpose", "granted", "source"],
    closed=True,
)
MERGE = r.obj({"duplicate_id": MEMBER_ID}, ["duplicate_id"], closed=True)
FILTERS: dict[str, r.Schema] = {
    "mobile": MOBILE,
    "name_prefix": NAME,
    "home_store": r.string(r.CODE),
    "tier": r.string(r.CODE),
    "state": STATE,
}
PATH = {"member_id": MEMBER_ID}

# --- handlers ------------------------------------------------------------------------------------


def _cursor(q: dict[str, Any]) -> int | None:
    after = q.pop("after", None)
    if after is None:
        return None
    if not (after.isascii() and after.isdigit() and len(after) <= 18):
        raise ApiError(400, "invalid_value", "after is a cursor from next_after", "after")
    return int(after)


def _page(items: list[dict[str, Any]], next_after: str | None) -> web.Response:
    return web.json_response({"items": items, "next_after": next_after})


async def _post_member(request: web.Request) -> web.Response:
    service = members(request)
    b = await r.body(request, NEW_MEMBER)
    return web.json_response(await service.create(principal(request), b), status=201)


async def _list_members(request: web.Request) -> web.Response:
    service = members(request)
    q = r.query(request, {**r.PAGE_QUERY, **FILTERS})
    limit = q.pop("limit", limits.PAGE_LIMIT_DEFAULT)
    after = _cursor(q)
    return _page(*await service.list_members(principal(request), q, after, limit))


async def _lookup(request: web.Request) -> web.Response:
    service = members(request)
    b = await r.body(request, LOOKUP)
    items, next_after = await service.lookup_by_id(
        principal(request),
        IdType(b["id_type"]),
        b["id_number"],
        None if "after" not in b else int(b["after"]),
        b.get("limit", limits.PAGE_LIMIT_DEFAULT),
    )
    return _page(items, next_after)


async def _get_member(request: web.Request) -> web.Response:
    service = members(request)
    member_id = _member_id(request)
    return web.json_response(await service.get(principal(request), member_id))


async def _patch_member(request: web.Request) -> web.Response:
    service = members(request)
    member_id = _member_id(request)
    b = await r.body(request, MEMBER_CHANGES)
    return web.json_response(await service.update(principal(request), member_id, b))


async def _delete_member(request: web.Request) -> web.Response:
    service = members(request)
    member_id = _member_id(request)
    return web.json_response(await service.delete(principal(request), member_id))


async def _merge(request: web.Request) -> web.Response:
    service = members(request)
    member_id = _member_id(request)
    b = await r.body(request, MERGE)
    view = await service.merge(principal(request), member_id, b["duplicate_id"])
    return web.json_response(view)


async def _post_consent(request: web.Request) -> web.Response:
    service = members(request)
    member_id = _member_id(request)
    b = await r.body(request, NEW_CONSENT)
    view = await service.consent(
        principal(request), member_id, Purpose(b["purpose"]), b["granted"], b["source"]
    )
    return web.json_response(view, status=201)


async def _list_consents(request: web.Request) -> web.Response:
    service = members(request)
    member_id = _member_id(request)
    q = r.query(request, r.PAGE_QUERY)
    limit = q.pop("limit", limits.PAGE_LIMIT_DEFAULT)
    after = _cursor(q)
    return _page(*await service.consents(principal(request), member_id, after, limit))


_ALL = (400, 403, 404, 409)
ROUTES = [
    r.Route("POST", "/v1/members", _post_member,
            "Register a member at a store (mobile unique in the group)", "members",
            "members_write", NEW_MEMBER, answers={201: MEMBER}, refusals=_ALL),
    r.Route("GET", "/v1/members", _list_members,
            "List members in scope, by mobile, name prefix, store, tier or state", "members",
            "members_read", query={**r.PAGE_QUERY, **FILTERS},
            answers={200: r.page_of(MEMBER_SUMMARY)}, refusals=(400, 403)),
    r.Route("POST", "/v1/members/lookup", _lookup,
            "Find members by ID document (the number goes in the body, never the URL)",
            "members", "members_read", LOOKUP, answers={200: r.page_of(MEMBER_SUMMARY)},
            refusals=(400, 403)),
    r.Route("GET", "/v1/members/{member_id}", _get_member, "One member and its cards",
            "members", "members_read", path_params=PATH, answers={200: MEMBER}),
    r.Route("PATCH", "/v1/members/{member_id}", _patch_member,
            "Change a member's personal data, tier or home store", "members",
            "members_write", MEMBER_CHANGES, path_params=PATH, answers={200: MEMBER},
            refusals=_ALL),
    r.Route("DELETE", "/v1/members/{member_id}", _delete_member,
            "Delete a member and erase its personal data (refused while a card holds value)",
            "members", "members_write", path_params=PATH, answers={200: MEMBER},
            refusals=_ALL),
    r.Route("POST", "/v1/members/{member_id}/merge", _merge,
            "Merge a duplicate member into this one: its cards and balances move here",
            "members", "members_write", MERGE, path_params=PATH, answers={200: MEMBER},
            refusals=_ALL),
    r.Route("POST", "/v1/members/{member_id}/consents", _post_consent,
            "Give or withdraw an SMS consent (alerts or marketing)", "members",
            "members_write", NEW_CONSENT, path_params=PATH, answers={201: CONSENT},
            refusals=_ALL),
    r.Route("GET", "/v1/members/{member_id}/consents", _list_consents,
            "A member's consent history, oldest first", "members", "members_read",
            query=dict(r.PAGE_QUERY), path_params=PATH, answers={200: r.page_of(CONSENT)}),
]  # fmt: skip


def _member_id(request: web.Request) -> int:
    """The path's member id: 404 `member_not_found` for one that cannot be (0, text, past
    the column), as for one that is not there."""
    return r.path_int(request, "member_id", ID_MAX, code="member_not_found")
