"""The admin API's route table: each route with its permission, its request schema and its
answers. The same table registers the aiohttp handlers, validates every request body and
query string (jsonschema), and builds the OpenAPI 3 document served at /v1/openapi.json, so
the document cannot drift from what the server does.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiohttp import web
from jsonschema import Draft7Validator, validators
from jsonschema.exceptions import ValidationError, best_match

from cardcore import limits
from cardcore.api.edge import ApiError, read_json

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Schema = dict[str, Any]

# --- schema builders (small, so route tables stay readable) ---------------------------------


T = TypeVar("T")


def feature(request: web.Request, key: web.AppKey[T], what: str) -> T:
    """The feature service the application registered under `key`. The services that seal
    secrets or move money exist only with a key-encrypting key: without one, 503
    `kek_missing`."""
    found = request.app.get(key)
    if found is None:
        raise ApiError(
            503, "kek_missing", f"{what} need a key-encrypting key (CARDCORE_KEK or kek_file)"
        )
    return found


def ledger_unavailable_as_503(
    *errors: type[Exception],
) -> Callable[[Handler], Handler]:
    """A route decorator: a service that could not take a ledger step now (one of
    `errors`) answers 503 `ledger_unavailable` (retry)."""

    def wrap(handler: Handler) -> Handler:
        async def wrapped(request: web.Request) -> web.StreamResponse:
            try:
                return await handler(request)
            except errors as exc:
                raise ApiError(503, "ledger_unavailable", str(exc)) from None

        wrapped.__name__ = handler.__name__
        return wrapped

    return wrap


def string(pattern: str | None = None, *, max_length: int = 64, **extra: Any) -> Schema:
    out: Schema = {"type": "string", "maxLength": max_length, **extra}
    if pattern is not None:
        out["pattern"] = f"^(?:{pattern})$"
    return out


def integer(low: int = 0, high: int = limits.POS_AMOUNT_MAX, **extra: Any) -> Schema:
    return {"type": "integer", "minimum": low, "maximum": high, **extra}


def boolean(**extra: Any) -> Schema:
    return {"type": "boolean", **extra}


def enum(values: Sequence[str]) -> Schema:
    return {"type": "string", "enum": list(values)}


def obj(
    properties: dict[str, Schema], required: Sequence[str] = (), *, closed: bool = True
) -> Schema:
    out: Schema = {"type": "object", "properties": properties}
    if required:
        out["required"] = list(required)
    if closed:
        out["additionalProperties"] = False
    return out


def array(items: Schema, max_items: int = limits.PAGE_LIMIT_MAX) -> Schema:
    return {"type": "array", "items": items, "maxItems": max_items}


def nullable(schema: Schema) -> Schema:
    return {**schema, "nullable": True}


def page_of(item: Schema) -> Schema:
    return obj(
        {"items": array(item), "next_after": nullable(string(max_length=64))},
        ["items", "next_after"],
        closed=False,
    )


CODE = r"[A-Za-z0-9][A-Za-z0-9._-]{0,31}"
# A name people type: printable, no control characters, line separators or lone surrogates.
NAME = string(r"[^\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]{1,64}")
TIME_MS = integer(0, 2**62)  # a Unix time in milliseconds
DATE = r"[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"
ERROR = obj(
    {
        "error": obj(
            {
                "code": string(max_length=64),
                "message": string(max_length=2048),
                "field": nullable(string(max_length=256)),
            },
            ["code", "message", "field"],
        )
    },
    ["error"],
)
PAGE_QUERY: dict[str, Schema] = {
    "limit": integer(1, limits.PAGE_LIMIT_MAX),
    "after": string(max_length=64),
}


@dataclass(frozen=True)
class Route:
    method: str
    path: str  # aiohttp form: /v1/cards/{card_id}
    handler: Handler
    summary: str
    tag: str
    perm: str = ""  # the permission it needs, shown in the document
    body: Schema | None = None
    query: dict[str, Schema] = field(default_factory=dict)
    path_params: dict[str, Schema] = field(default_factory=dict)
    answers: dict[int, Schema] = field(default_factory=dict)  # success status -> schema
    refusals: tuple[int, ...] = (400, 401, 403, 404)
    public: bool = False
    media: str = "application/json"  # of the success answers (text/csv for an export)


def register(router: web.UrlDispatcher, routes: Sequence[Route]) -> None:
    """Add the routes; one that takes no query parameters refuses any (400
    `unknown_parameter`, as a listing refuses a name it does not know)."""
    for route in routes:
        router.add_route(
            route.method, route.path, route.handler if route.query else _no_query(route.handler)
        )


def _no_query(handler: Handler) -> Handler:
    async def refusing(request: web.Request) -> web.StreamResponse:
        for name in request.query:
            raise ApiError(400, "unknown_parameter", "query parameter is not allowed", name)
        return await handler(request)

    return refusing


# --- validation --------------------------------------------------------------------------------

_STRICT = validators.extend(
    Draft7Validator,
    type_checker=Draft7Validator.TYPE_CHECKER.redefine(
        "integer", lambda _checker, value: isinstance(value, int) and not isinstance(value, bool)
    ),
)
_validators: dict[int, tuple[Schema, Any]] = {}


def _validator(schema: Schema) -> Any:
    """A validator per schema object; "integer" means a JSON integer, never 5.0. Route
    schemas are module constants, so the cache holds one entry per schema (bounded anyway,
    and keyed with the schema kept alive so an id is never reused for another)."""
    found = _validators.get(id(schema))
    if found is not None and found[0] is schema:
        return found[1]
    validator = _STRICT(schema)
    if len(_validators) < limits.SCHEMA_VALIDATORS_MAX:
        _validators[id(schema)] = (schema, validator)
    return validator


def check(schema: Schema, value: object, where: str = "") -> None:
    """Raise ApiError 400 with a stable code naming the first field that breaks `schema`."""
    error = best_match(_validator(schema).iter_errors(value))
    if error is None:
        return
    raise _api_error(error, where)


def _api_error(error: ValidationError, where: str) -> ApiError:
    path = ".".join(str(p) for p in error.absolute_path)
    name = (f"{where}.{path}" if where and path else where or path) or None
    if error.validator == "additionalProperties":
        extra = sorted(set(error.instance) - set(error.schema.get("properties", {})))
        unknown = extra[0] if extra else "?"
        field_name = f"{name}.{unknown}" if name else unknown
        return ApiError(400, "unknown_field", "field is not allowed", field_name)
    if error.validator == "required":
        missing = re.findall(r"'([^']+)' is a required property", error.message)
        missing_name = missing[0] if missing else "?"
        field_name = f"{name}.{missing_name}" if name else missing_name
        return ApiError(400, "missing_field", "field is required", field_name)
    if error.validator == "type":
        return ApiError(400, "wrong_type", f"expected {error.validator_value}", name)
    return ApiError(400, "invalid_value", _message(error), name)


def _message(error: ValidationError) -> str:
    v, limit = error.validator, error.validator_value
    messages = {
        "pattern": "does not have the required form",
        "maxLength": f"at most {limit} characters",
        "minLength": f"at least {limit} characters",
        "minimum": f"at least {limit}",
        "maximum": f"at most {limit}",
        "enum": f"one of {limit}",
        "maxItems": f"at most {limit} items",
        "minItems": f"at least {limit} items",
        "minProperties": "give at least one field",
        "uniqueItems": "items must differ",
    }
    return messages.get(str(v), "invalid value")


# C0 and C1 controls, and the bidirectional overrides that can make a name read backwards.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def _clean(value: object, where: str) -> None:
    """Strings in requests hold no control characters and no lone surrogates (JSON can
    carry both; neither belongs in a name, a code or a number, and a lone surrogate is not
    UTF-8 a database can store). Also makes a pattern's `$` mean the end, as in ECMA."""
    if isinstance(value, str):
        if _CONTROL.search(value):
            raise ApiError(400, "invalid_value", "control characters are not allowed", where)
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(400, "invalid_value", "not valid Unicode text", where) from None
    elif isinstance(value, dict):
        for name, item in value.items():
            _clean(name, where or "body")
            _clean(item, f"{where}.{name}" if where else str(name))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _clean(item, f"{where}[{i}]")


async def body(request: web.Request, schema: Schema) -> dict[str, Any]:
    value = await read_json(request)
    _clean(value, "")
    check(schema, value)
    assert isinstance(value, dict)
    return value


def query(request: web.Request, schema: dict[str, Schema]) -> dict[str, Any]:
    """The query string, typed by the route's query schema; unknown names are refused."""
    out: dict[str, Any] = {}
    for name in request.query:
        if name not in schema:
            raise ApiError(400, "unknown_parameter", "query parameter is not allowed", name)
        values = request.query.getall(name)
        if len(values) != 1:
            raise ApiError(400, "invalid_value", "give the parameter once", name)
        raw = values[0]
        _clean(raw, name)
        kind = schema[name].get("type")
        value: object = raw
        if kind == "integer":
            if not re.fullmatch(r"-?[0-9]{1,19}", raw):
                raise ApiError(400, "wrong_type", "expected integer", name)
            value = int(raw)
        elif kind == "boolean":
            if raw not in ("true", "false"):
                raise ApiError(400, "wrong_type", "expected true or false", name)
            value = raw == "true"
        check(schema[name], value, name)
        out[name] = value
    return out


def path_int(request: web.Request, name: str, high: int = 2**62, code: str = "not_found") -> int:
    """An id in the path; 404 `code` for anything that cannot be one (the column's range
    included: PostgreSQL refuses an int4 comparison past 2**31 - 1)."""
    raw = request.match_info[name]
    if not re.fullmatch(r"[0-9]{1,19}", raw) or not 1 <= int(raw) <= high:
        raise ApiError(404, code, f"no such {name.removesuffix('_id')}", name)
    return int(raw)


def cursor_int(q: dict[str, Any], high: int = 2**62) -> int | None:
    """The `after` cursor of a listing keyed by integer ids (from `next_after`)."""
    after = q.get("after")
    if after is None:
        return None
    text = str(after)
    if not re.fullmatch(r"[0-9]{1,19}", text) or int(text) > high:
        raise ApiError(400, "invalid_value", "after is a cursor from next_after", "after")
    return int(text)


def path_code(request: web.Request, name: str) -> str:
    raw = request.match_info[name]
    if not re.fullmatch(CODE, raw):
        raise ApiError(404, "not_found", f"no such {name.removesuffix('_id')}", name)
    return raw


def page(items: list[dict[str, Any]], limit: int, cursor: str) -> web.Response:
    """One page of a listing read with `limit + 1` rows: `next_after` when there is more."""
    more = len(items) > limit
    items = items[:limit]
    return web.json_response(
        {"items": items, "next_after": str(items[-1][cursor]) if more and items else None}
    )


# --- the OpenAPI document ------------------------------------------------------------------------

_STATUS_TEXT = {
    200: "OK",
    201: "Created",
    400: "The request is malformed or breaks a rule; nothing changed",
    401: "Missing, unknown, expired or revoked token",
    403: "The token's role or scope does not allow this; nothing changed",
    404: "No such object",
    408: "The body did not arrive whole in time (HTTP_BODY_READ_S); nothing changed",
    409: "The request conflicts with the current state; nothing changed",
    413: "Request body too large",
    415: "The body is not sent as application/json",
    503: "The ledger cannot answer now; retry",
}


def openapi(routes: Sequence[Route], version: str) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for r in routes:
        operation: dict[str, Any] = {
            "operationId": f"{r.method.lower()}_{_op_name(r.path)}",
            "summary": r.summary,
            "tags": [r.tag],
            "responses": {},
        }
        if r.perm:
            operation["description"] = f"Needs the permission `{r.perm}` in the token's scope."
        if r.public:
            operation["security"] = []
        parameters = [
            {"name": n, "in": "path", "required": True, "schema": s}
            for n, s in r.path_params.items()
        ] + [{"name": n, "in": "query", "required": False, "schema": s} for n, s in r.query.items()]
        if parameters:
            operation["parameters"] = parameters
        if r.body is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": r.body}},
            }
        for status, schema in r.answers.items():
            operation["responses"][str(status)] = {
                "description": _STATUS_TEXT.get(status, "OK"),
                "content": {r.media: {"schema": schema}},
            }
        refusals = (
            ()
            if r.public
            else (*r.refusals, 401, 413, *([408, 415] if r.body is not None else []), 503)
        )
        for status in sorted(set(refusals)):
            operation["responses"][str(status)] = {
                "description": _STATUS_TEXT[status],
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
            }
        paths.setdefault(r.path, {})[r.method.lower()] = operation
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "cardcore admin API",
            "version": version,
            "description": (
                "Organization, staff and tokens, grants, members, card classes and cards. "
                "Every call but this document needs `Authorization: Bearer <token>`; the "
                "token's role and scope decide what it may see and change. Errors are "
                '{"error": {"code", "message", "field"}} with a stable code.'
            ),
        },
        "servers": [{"url": "/"}],
        "paths": paths,
        "components": {
            "schemas": {"Error": ERROR},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }


def _op_name(path: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", path.removeprefix("/v1/").lower()).strip("_")
