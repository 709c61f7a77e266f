"""Admin routes of the organization: legal entities, stores, staff users and tokens, grants,
the audit log. Every route needs a staff token; `principal(request)` is its caller.

The route table (`ROUTES`) is also the OpenAPI document's source (`cardcore.api.routes`).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from cardcore import limits
from cardcore.api import routes as r
from cardcore.api.edge import ApiError
from cardcore.org.model import Function, Principal, Role, Scope, ScopeKind
from cardcore.org.service import OrgService

ORG_KEY = web.AppKey("org", OrgService)
PRINCIPAL_KEY = web.RequestKey("principal", Principal)


def principal(request: web.Request) -> Principal:
    """The caller, set by the edge middleware from the bearer token."""
    found: Principal | None = request.get(PRINCIPAL_KEY)
    if found is None:
        raise ApiError(401, "unauthorized", "missing or wrong bearer token")
    return found


def org(request: web.Request) -> OrgService:
    return request.app[ORG_KEY]


# --- schemas -------------------------------------------------------------------------------------

NAME = r.string(r"[^\x00-\x1f\x7f]{1,64}")
ENTITY = r.obj({"id": r.string(r.CODE), "name": NAME, "created_at_ms": r.integer(0, 2**62)},
               ["id", "name", "created_at_ms"])  # fmt: skip
STORE_STATE = r.enum(["open", "closed"])
STORE = r.obj(
    {
        "id": r.string(r.CODE),
        "legal_entity": r.string(r.CODE),
        "name": NAME,
        "region": NAME,
        "city": NAME,
        "state": STORE_STATE,
        "created_at_ms": r.integer(0, 2**62),
    },
    ["id", "legal_entity", "name", "region", "city", "state", "created_at_ms"],
)
USER = r.obj(
    {
        "id": r.integer(1, 2**62),
        "name": r.string(r.CODE),
        "role": r.enum([x.value for x in Role]),
        "scope_kind": r.enum([x.value for x in ScopeKind]),
        "scope_id": r.string(f"|{r.CODE}"),
        "scope_entity": r.string(f"|{r.CODE}"),
        "state": r.enum(["active", "disabled"]),
        "created_at_ms": r.integer(0, 2**62),
    },
    ["id", "name", "role", "scope_kind", "scope_id", "scope_entity", "state", "created_at_ms"],
)
TOKEN = r.obj(
    {
        "id": r.integer(1, 2**62),
        "user_id": r.integer(1, 2**62),
        "label": r.string(max_length=64),
        "created_at_ms": r.integer(0, 2**62),
        "expires_at_ms": r.integer(0, 2**63),
        "revoked_at_ms": r.nullable(r.integer(0, 2**62)),
        "token": r.string(max_length=128),
    },
    ["id", "user_id", "label", "created_at_ms", "expires_at_ms", "revoked_at_ms"],
)
BUDGET = r.integer(0, limits.AMOUNT_MAX)
GRANT = r.obj(
    {
        "id": r.integer(1, 2**62),
        "store": r.string(r.CODE),
        "function": r.enum([x.value for x in Function]),
        "product": r.string(f"|{r.CODE}"),
        "budget_count": r.nullable(BUDGET),
        "budget_amount": r.nullable(BUDGET),
        "used_count": BUDGET,
        "used_amount": BUDGET,
        "valid_from": r.string(f"|{r.DATE}"),
        "valid_to": r.string(f"|{r.DATE}"),
        "state": r.enum(["active", "revoked"]),
        "created_at_ms": r.integer(0, 2**62),
    },
    ["id", "store", "function", "product", "budget_count", "budget_amount", "used_count",
     "used_amount", "valid_from", "valid_to", "state", "created_at_ms"],
)  # fmt: skip
AUDIT = r.obj(
    {
        "id": r.integer(1, 2**62),
        "at_ms": r.integer(0, 2**62),
        "user_id": r.integer(0, 2**62),
        "user": r.string(max_length=32),
        "token_id": r.integer(0, 2**62),
        "role": r.string(max_length=32),
        "action": r.string(max_length=64),
        "object_kind": r.string(max_length=32),
        "object_id": r.string(max_length=64),
        "entity": r.string(max_length=32),
        "store": r.string(max_length=32),
        "before": r.nullable({"type": "object"}),
        "after": r.nullable({"type": "object"}),
    },
    ["id", "at_ms", "user_id", "user", "token_id", "role", "action", "object_kind",
     "object_id", "entity", "store", "before", "after"],
)  # fmt: skip

NEW_ENTITY = r.obj({"id": r.string(r.CODE), "name": NAME}, ["id", "name"])
NEW_STORE = r.obj(
    {"id": r.string(r.CODE), "legal_entity": r.string(r.CODE), "name": NAME, "region": NAME,
     "city": NAME},
    ["id", "legal_entity", "name", "region", "city"],
)  # fmt: skip
STORE_CHANGES = {
    **r.obj({"name": NAME, "region": NAME, "city": NAME, "state": STORE_STATE}),
    "minProperties": 1,
}
NEW_USER = r.obj(
    {
        "name": r.string(r.CODE),
        "role": r.enum([x.value for x in Role]),
        "scope_kind": r.enum([x.value for x in ScopeKind]),
        "scope_id": r.string(f"|{r.CODE}"),
    },
    ["name", "role", "scope_kind"],
)
USER_CHANGES = r.obj({"state": r.enum(["active", "disabled"])}, ["state"])
NEW_TOKEN = r.obj(
    {"label": r.string(max_length=64), "ttl_s": r.integer(60, limits.TOKEN_TTL_S_MAX)}
)
NEW_GRANT = r.obj(
    {
        "store": r.string(r.CODE),
        "function": r.enum([x.value for x in Function]),
        "product": r.string(f"|{r.CODE}"),
        "budget_count": BUDGET,
        "budget_amount": BUDGET,
        "valid_from": r.string(f"|{r.DATE}"),
        "valid_to": r.string(f"|{r.DATE}"),
    },
    ["store", "function"],
)
RECORD_ID = r.integer(1, limits.RECORD_ID_MAX)
ID = {"user_id": RECORD_ID}

# --- handlers ------------------------------------------------------------------------------------


def _page_args(request: web.Request, extra: dict[str, r.Schema] | None = None) -> dict[str, Any]:
    return r.query(request, {**r.PAGE_QUERY, **(extra or {})})


def _int_cursor(q: dict[str, Any]) -> int | None:
    return r.cursor_int(q, limits.RECORD_ID_MAX)


async def _post_entity(request: web.Request) -> web.Response:
    b = await r.body(request, NEW_ENTITY)
    view = await org(request).create_entity(principal(request), b["id"], b["name"])
    return web.json_response(view, status=201)


async def _list_entities(request: web.Request) -> web.Response:
    q = _page_args(request)
    limit = q.get("limit", limits.PAGE_LIMIT_DEFAULT)
    rows = await org(request).list_entities(principal(request), q.get("after"), limit)
    return r.page(rows, limit, "id")


async def _get_entity(request: web.Request) -> web.Response:
    entity_id = r.path_code(request, "entity_id")
    return web.json_response(await org(request).get_entity(principal(request), entity_id))


async def _post_store(request: web.Request) -> web.Response:
    b = await r.body(request, NEW_STORE)
    return web.json_response(await org(request).create_store(principal(request), b), status=201)


STORE_FILTERS = {
    "legal_entity": r.string(r.CODE),
    "region": r.string(max_length=64),
    "city": r.string(max_length=64),
    "state": STORE_STATE,
}


async def _list_stores(request: web.Request) -> web.Response:
    q = _page_args(request, STORE_FILTERS)
    limit = q.pop("limit", limits.PAGE_LIMIT_DEFAULT)
    after = q.pop("after", None)
    rows = await org(request).list_stores(principal(request), q, after, limit)
    return r.page(rows, limit, "id")


async def _get_store(request: web.Request) -> web.Response:
    store_id = r.path_code(request, "store_id")
    return web.json_response(await org(request).get_store(principal(request), store_id))


async def _patch_store(request: web.Request) -> web.Response:
    store_id = r.path_code(request, "store_id")
    b = await r.body(request, STORE_CHANGES)
    return web.json_response(await org(request).update_store(principal(request), store_id, b))


async def _post_user(request: web.Request) -> web.Response:
    b = await r.body(request, NEW_USER)
    scope = Scope(ScopeKind(b["scope_kind"]), b.get("scope_id", ""))
    if scope.kind is not ScopeKind.GROUP and not scope.id:
        raise ApiError(400, "missing_field", "an entity or store scope names its id", "scope_id")
    view = await org(request).create_user(principal(request), b["name"], Role(b["role"]), scope)
    return web.json_response(view, status=201)


async def _list_users(request: web.Request) -> web.Response:
    q = _page_args(request)
    limit = q.get("limit", limits.PAGE_LIMIT_DEFAULT)
    rows = await org(request).list_users(principal(request), _int_cursor(q), limit)
    return r.page(rows, limit, "id")


async def _get_user(request: web.Request) -> web.Response:
    user_id = r.path_int(request, "user_id", limits.RECORD_ID_MAX)
    return web.json_response(await org(request).get_user(principal(request), user_id))


async def _patch_user(request: web.Request) -> web.Response:
    user_id = r.path_int(request, "user_id", limits.RECORD_ID_MAX)
    b = await r.body(request, USER_CHANGES)
    view = await org(request).set_user_state(principal(request), user_id, b["state"])
    return web.json_response(view)


async def _post_token(request: web.Request) -> web.Response:
    user_id = r.path_int(request, "user_id", limits.RECORD_ID_MAX)
    b = await r.body(request, NEW_TOKEN)
    view = await org(request).create_token(
        principal(request),
        user_id,
        b.get("label", ""),
        b.get("ttl_s", limits.TOKEN_TTL_S_DEFAULT),
    )
    return web.json_response(view, status=201)


async def _list_tokens(request: web.Request) -> web.Response:
    user_id = r.path_int(request, "user_id", limits.RECORD_ID_MAX)
    q = _page_args(request)
    limit = q.get("limit", limits.PAGE_LIMIT_DEFAULT)
    tokens = await org(request).list_tokens(principal(request), user_id, _int_cursor(q), limit)
    return r.page(tokens, limit, "id")


async def _delete_token(request: web.Request) -> web.Response:
    token_id = r.path_int(request, "token_id", limits.RECORD_ID_MAX)
    return web.json_response(await org(request).revoke_token(principal(request), token_id))


async def _post_grant(request: web.Request) -> web.Response:
    b = await r.body(request, NEW_GRANT)
    values = {
        "store": b["store"],
        "function": b["function"],
        "product": b.get("product", ""),
        "budget_count": b.get("budget_count"),
        "budget_amount": b.get("budget_amount"),
        "valid_from": b.get("valid_from", ""),
        "valid_to": b.get("valid_to", ""),
    }
    return web.json_response(
        await org(request).create_grant(principal(request), values), status=201
    )


GRANT_FILTERS = {"store": r.string(r.CODE)}


async def _list_grants(request: web.Request) -> web.Response:
    q = _page_args(request, GRANT_FILTERS)
    limit = q.get("limit", limits.PAGE_LIMIT_DEFAULT)
    rows = await org(request).list_grants(principal(request), q.get("store"), _int_cursor(q), limit)
    return r.page(rows, limit, "id")


async def _delete_grant(request: web.Request) -> web.Response:
    grant_id = r.path_int(request, "grant_id", limits.RECORD_ID_MAX)
    return web.json_response(await org(request).revoke_grant(principal(request), grant_id))


AUDIT_FILTERS = {
    "object_kind": r.string(max_length=32),
    "object_id": r.string(max_length=64),
    "action": r.string(max_length=64),
    "entity": r.string(r.CODE),
    "store": r.string(r.CODE),
    "user_id": r.integer(0, limits.RECORD_ID_MAX),
    "since_ms": r.integer(0, 2**62),
}


async def _list_audit(request: web.Request) -> web.Response:
    q = _page_args(request, AUDIT_FILTERS)
    limit = q.pop("limit", limits.PAGE_LIMIT_DEFAULT)
    after = _int_cursor(q)
    q.pop("after", None)
    rows = await org(request).audit_page(principal(request), q, after, limit)
    return r.page(rows, limit, "id")


_PAGE = dict(r.PAGE_QUERY)
ENTITY_ID = {"entity_id": r.string(r.CODE)}
STORE_ID = {"store_id": r.string(r.CODE)}
TOKEN_ID = {"token_id": RECORD_ID}
GRANT_ID = {"grant_id": RECORD_ID}

ROUTES = [
    r.Route("POST", "/v1/legal-entities", _post_entity, "Add a legal entity", "organization",
            "org_write", NEW_ENTITY, answers={201: ENTITY}, refusals=(400, 403, 409)),
    r.Route("GET", "/v1/legal-entities", _list_entities, "List legal entities", "organization",
            "org_read", query=_PAGE, answers={200: r.page_of(ENTITY)}, refusals=(400, 403)),
    r.Route("GET", "/v1/legal-entities/{entity_id}", _get_entity, "One legal entity",
            "organization", "org_read", path_params=ENTITY_ID, answers={200: ENTITY}),
    r.Route("POST", "/v1/stores", _post_store, "Add a store to a legal entity", "organization",
            "org_write", NEW_STORE, answers={201: STORE}, refusals=(400, 403, 404, 409)),
    r.Route("GET", "/v1/stores", _list_stores, "List stores", "organization", "org_read",
            query={**_PAGE, **STORE_FILTERS}, answers={200: r.page_of(STORE)},
            refusals=(400, 403)),
    r.Route("GET", "/v1/stores/{store_id}", _get_store, "One store", "organization",
            "org_read", path_params=STORE_ID, answers={200: STORE}),
    r.Route("PATCH", "/v1/stores/{store_id}", _patch_store,
            "Rename a store, change its region or city, open or close it", "organization",
            "org_write", STORE_CHANGES, path_params=STORE_ID, answers={200: STORE}),
    r.Route("POST", "/v1/users", _post_user, "Add a staff user with a role and a scope", "staff",
            "staff_write", NEW_USER, answers={201: USER}, refusals=(400, 403, 404, 409)),
    r.Route("GET", "/v1/users", _list_users, "List staff users", "staff", "staff_read",
            query=_PAGE, answers={200: r.page_of(USER)}, refusals=(400, 403)),
    r.Route("GET", "/v1/users/{user_id}", _get_user, "One staff user", "staff", "staff_read",
            path_params=ID, answers={200: USER}),
    r.Route("PATCH", "/v1/users/{user_id}", _patch_user, "Disable or enable a staff user",
            "staff", "staff_write", USER_CHANGES, path_params=ID, answers={200: USER},
            refusals=(400, 403, 404, 409)),
    r.Route("POST", "/v1/users/{user_id}/tokens", _post_token,
            "Issue an API token (the secret is answered this once)", "staff", "staff_write",
            NEW_TOKEN, path_params=ID, answers={201: TOKEN}, refusals=(400, 403, 404, 409)),
    r.Route("GET", "/v1/users/{user_id}/tokens", _list_tokens, "A user's tokens (no secrets)",
            "staff", "staff_read", path_params=ID, query=_PAGE, answers={200: r.page_of(TOKEN)}),
    r.Route("DELETE", "/v1/tokens/{token_id}", _delete_token, "Revoke a token", "staff",
            "staff_write", path_params=TOKEN_ID, answers={200: TOKEN}),
    r.Route("POST", "/v1/grants", _post_grant,
            "Grant a store a card function (and product) with budgets and dates", "grants",
            "grants_write", NEW_GRANT, answers={201: GRANT}, refusals=(400, 403, 404)),
    r.Route("GET", "/v1/grants", _list_grants, "List grants", "grants", "grants_read",
            query={**_PAGE, **GRANT_FILTERS}, answers={200: r.page_of(GRANT)},
            refusals=(400, 403)),
    r.Route("DELETE", "/v1/grants/{grant_id}", _delete_grant, "Revoke a grant", "grants",
            "grants_write", path_params=GRANT_ID, answers={200: GRANT}),
    r.Route("GET", "/v1/audit", _list_audit, "The audit log of administrative changes", "audit",
            "audit_read", query={**_PAGE, **AUDIT_FILTERS}, answers={200: r.page_of(AUDIT)},
            refusals=(400, 403)),
]  # fmt: skip
