"""The HTTP edge shared by every route: the one error shape
{"error": {"code", "message", "field"}} and strict JSON bodies."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

from cardcore import limits


def error_response(
    status: int, code: str, message: str, field: str | None = None, **headers: str
) -> web.Response:
    body = {"error": {"code": code, "message": message, "field": field}}
    return web.json_response(body, status=status, headers=headers or None)


class ApiError(Exception):
    """Raised by handlers; the error middleware turns it into `error_response`."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field


async def read_json(request: web.Request) -> Any:
    """The request body as JSON, strictly: declared `application/json` (415 otherwise: a
    web page can send a `text/plain` POST to any address without asking first, but not
    this one), no NaN, no duplicate names, UTF-8 only; whole within `HTTP_BODY_READ_S` (408:
    a client sending it a byte at a time would hold its connection and memory for ever)."""
    if request.content_type != "application/json":
        raise ApiError(
            415, "unsupported_media_type", "the body must be sent as Content-Type: application/json"
        )
    try:
        async with asyncio.timeout(limits.HTTP_BODY_READ_S):
            raw = await request.read()
    except TimeoutError:
        raise ApiError(
            408,
            "request_timeout",
            f"the body did not arrive whole within {limits.HTTP_BODY_READ_S} s",
        ) from None
    try:
        return json.loads(
            raw.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_no_constant
        )
    except UnicodeDecodeError:
        raise ApiError(400, "invalid_json", "body is not UTF-8") from None
    except _DuplicateField as exc:
        raise ApiError(400, "duplicate_field", f"field {exc} appears twice", str(exc)) from None
    except RecursionError:
        raise ApiError(400, "invalid_json", "body nests too deeply") from None
    except ValueError as exc:
        raise ApiError(400, "invalid_json", f"body is not valid JSON: {exc}") from None


class _DuplicateField(ValueError):
    """A JSON object names a field twice."""


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for name, _ in pairs:
            if name in seen:
                raise _DuplicateField(name)
            seen.add(name)
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number")
