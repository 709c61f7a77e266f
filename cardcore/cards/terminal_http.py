"""Admin routes of POS terminals: register in a store (the master key is answered once),
list, read, disable and enable."""

from __future__ import annotations

from aiohttp import web

from cardcore import limits
from cardcore.api import routes as r
from cardcore.api.edge import ApiError
from cardcore.cards.http import KEK_KEY, master_key_answer, new_master_key
from cardcore.cards.model import is_terminal_id
from cardcore.cards.terminals import TerminalAdmin
from cardcore.org.http import principal

TERMINALS_KEY = web.AppKey("terminals", TerminalAdmin)

TID = r.string("[A-Za-z0-9]{8}", max_length=8)
TERMINAL = r.obj(
    {
        "tid": TID,
        "mid": r.string("[A-Za-z0-9]{15}", max_length=15),
        "store": r.string(max_length=64),
        "legal_entity": r.string(max_length=64),
        "key_mode": r.enum(["aes", "3des"]),
        "state": r.enum(["active", "disabled"]),
        "batch": r.string("[0-9]{6}", max_length=6),
        "created_at_ms": r.integer(0, 2**62),
        "tmk": r.string("[0-9A-F]{32}", max_length=32),
        "kcv": r.string("[0-9A-F]{8}", max_length=8),
    },
    ["tid", "mid", "store", "legal_entity", "key_mode", "state", "batch", "created_at_ms"],
)
NEW_TERMINAL = r.obj(
    {
        "tid": TID,
        "mid": r.string("[A-Za-z0-9]{15}", max_length=15),
        "store": r.string(r.CODE),
        "key_mode": r.enum(["aes", "3des"]),
    },
    ["tid", "mid", "store"],
)
TERMINAL_CHANGES = r.obj({"state": r.enum(["active", "disabled"])}, ["state"])
FILTERS = {"store": r.string(r.CODE), "legal_entity": r.string(r.CODE),
           "state": r.enum(["active", "disabled"])}  # fmt: skip


def _service(request: web.Request) -> TerminalAdmin:
    return r.feature(request, TERMINALS_KEY, "terminals")


def _tid(request: web.Request) -> str:
    tid = request.match_info["tid"]
    if not is_terminal_id(tid):
        raise ApiError(404, "terminal_not_found", "no such terminal", "tid")
    return tid


async def _post(request: web.Request) -> web.Response:
    service = _service(request)
    b = await r.body(request, NEW_TERMINAL)
    mode, tmk, sealed = new_master_key(request.app[KEK_KEY], b["tid"], b.get("key_mode", "aes"))
    view = await service.register(
        principal(request),
        tid=b["tid"],
        mid=b["mid"],
        store=b["store"],
        key_mode=str(mode),
        tmk_sealed=sealed,
    )
    return web.json_response({**view, **master_key_answer(mode, tmk)}, status=201)


async def _list(request: web.Request) -> web.Response:
    q = r.query(request, {**r.PAGE_QUERY, **FILTERS})
    limit = q.pop("limit", limits.PAGE_LIMIT_DEFAULT)
    after = q.pop("after", None)
    rows = await _service(request).list(principal(request), q, after, limit)
    return r.page(rows, limit, "tid")


async def _get(request: web.Request) -> web.Response:
    return web.json_response(await _service(request).get(principal(request), _tid(request)))


async def _patch(request: web.Request) -> web.Response:
    service = _service(request)
    tid = _tid(request)
    b = await r.body(request, TERMINAL_CHANGES)
    return web.json_response(await service.set_state(principal(request), tid, b["state"]))


TOTALS = r.obj(
    {name: r.integer(0, 2**62) for name in
     ("debit_amount", "debit_count", "credit_amount", "credit_count")},
    ["debit_amount", "debit_count", "credit_amount", "credit_count"],
)  # fmt: skip
SETTLEMENT = r.obj(
    {
        "id": r.integer(1, 2**62),
        "tid": TID,
        "store": r.string(max_length=64),
        "batch": r.string("[0-9]{6}", max_length=6),
        "batch_cycle": r.integer(0, 2**62),
        "host": TOTALS,
        "terminal": TOTALS,
        "balanced": r.boolean(),
        "settled_at_ms": r.integer(0, 2**62),
        "host_now": TOTALS,
        "moved_since_close": r.boolean(),
    },
    ["id", "tid", "store", "batch", "batch_cycle", "host", "terminal", "balanced",
     "settled_at_ms", "host_now", "moved_since_close"],
)  # fmt: skip
SETTLEMENT_FILTERS = {"tid": TID, "store": r.string(r.CODE), "balanced": r.boolean()}


async def _settlements(request: web.Request) -> web.Response:
    q = r.query(request, {**r.PAGE_QUERY, **SETTLEMENT_FILTERS})
    limit = q.pop("limit", limits.PAGE_LIMIT_DEFAULT)
    after = r.cursor_int(q, 2**31 - 1)
    q.pop("after", None)
    rows = await _service(request).settlements(principal(request), q, after, limit)
    return r.page(rows, limit, "id")


PATH = {"tid": TID}
ROUTES = [
    r.Route("POST", "/v1/terminals", _post,
            "Register a POS terminal in a store (its master key is answered this once)",
            "terminals", "org_write", NEW_TERMINAL, answers={201: TERMINAL},
            refusals=(400, 403, 404, 409)),
    r.Route("GET", "/v1/terminals", _list, "List terminals", "terminals", "org_read",
            query={**r.PAGE_QUERY, **FILTERS}, answers={200: r.page_of(TERMINAL)},
            refusals=(400, 403)),
    r.Route("GET", "/v1/terminals/{tid}", _get, "One terminal", "terminals", "org_read",
            path_params=PATH, answers={200: TERMINAL}),
    r.Route("GET", "/v1/reports/settlements", _settlements,
            "Settled terminal batches: the host's totals beside the terminal's, balanced or not",
            "reports", "reports_read", query={**r.PAGE_QUERY, **SETTLEMENT_FILTERS},
            answers={200: r.page_of(SETTLEMENT)}, refusals=(400, 403)),
    r.Route("PATCH", "/v1/terminals/{tid}", _patch,
            "Disable or enable a terminal (the POS refuses a disabled one at once)",
            "terminals", "org_write", TERMINAL_CHANGES, path_params=PATH,
            answers={200: TERMINAL}),
]  # fmt: skip
