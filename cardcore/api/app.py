"""The aiohttp application: one edge middleware (authorization, errors, metrics), operator
routes, and the feature packages' routes. State lives in typed `web.AppKey`s; resources start
in `cleanup_ctx` and stop in reverse order."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from cardcore import __version__, limits
from cardcore.api import routes
from cardcore.api.edge import ApiError, error_response
from cardcore.cards import admin_http as cards_admin_http
from cardcore.cards import http as cards_http
from cardcore.cards import terminal_http
from cardcore.cards.accounts import Accounts
from cardcore.cards.model import Kind
from cardcore.cards.pins import Pins
from cardcore.cards.pos import PosService
from cardcore.cards.service import CardService
from cardcore.cards.terminals import TerminalAdmin
from cardcore.config import Config
from cardcore.coupons import http as coupons_http
from cardcore.coupons.service import CouponService
from cardcore.db import DATABASE_ERRORS
from cardcore.ledger import http as ledger_http
from cardcore.ledger.service import Ledger
from cardcore.manager_cards import http as manager_cards_http
from cardcore.manager_cards.service import ManagerCards
from cardcore.members import http as members_http
from cardcore.members.service import MemberService
from cardcore.metrics import Metrics
from cardcore.org import http as org_http
from cardcore.org.model import Refused
from cardcore.org.service import OrgService
from cardcore.points import http as points_http
from cardcore.points.service import PointsService
from cardcore.records import Records
from cardcore.service_cards import http as service_cards_http
from cardcore.service_cards.service import ServiceCards
from cardcore.vault import Vault

log = logging.getLogger(__name__)

METRICS_KEY = web.AppKey("metrics", Metrics)
CONFIG_KEY = web.AppKey("config", Config)


class DatabaseErrorLog:
    """A database error's traceback logged at most once every
    `DB_ERROR_LOG_INTERVAL_S`, with how many were not logged since: while the database
    is away every request fails, and each logged its traceback (65 a minute in an
    operations review). Called inside the `except` that caught it."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._last: float | None = None
        self._quiet = 0

    def log(self, method: str, route: str) -> None:
        now = self._clock()
        if self._last is not None and now - self._last < limits.DB_ERROR_LOG_INTERVAL_S:
            self._quiet += 1
            return
        log.exception(
            "database error in %s %s", method, route, extra={"not_logged_since": self._quiet}
        )
        self._last, self._quiet = now, 0


DB_ERRORS_KEY = web.AppKey("database_errors", DatabaseErrorLog)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
OPENAPI_PATH = "/v1/openapi.json"
RETRY = {"Retry-After": "1"}
ADMIN_ROUTES: list[routes.Route] = [
    *org_http.ROUTES,
    *terminal_http.ROUTES,
    *members_http.ROUTES,
    *cards_admin_http.ROUTES,
    *points_http.ROUTES,
    *service_cards_http.ROUTES,
    *manager_cards_http.ROUTES,
    *coupons_http.ROUTES,
]


def build_app(
    config: Config,
    metrics: Metrics,
    ledger: Ledger,
    pos: PosService | None = None,
    kek: bytes | None = None,
) -> web.Application:
    """The HTTP service. Without `pos` (no key-encrypting key) the POS route answers 503."""
    app = web.Application(
        client_max_size=limits.REQUEST_BODY_BYTES_MAX,
        middlewares=[_edge_middleware],
    )
    app[CONFIG_KEY], app[DB_ERRORS_KEY] = config, DatabaseErrorLog()
    app[METRICS_KEY] = metrics
    app[ledger_http.LEDGER_KEY] = ledger
    app.cleanup_ctx.append(_ledger_lifecycle)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)
    ledger_http.add_routes(app.router)
    records = Records(ledger.store.engine)
    app[org_http.ORG_KEY] = OrgService(records)
    routes.register(app.router, ADMIN_ROUTES)
    document = routes.openapi(ADMIN_ROUTES, __version__)

    async def openapi_route(_request: web.Request) -> web.Response:
        return web.json_response(document)

    app.router.add_get(OPENAPI_PATH, openapi_route)
    if pos is not None and kek is not None:
        app[cards_http.POS_KEY] = pos
        app[cards_http.KEK_KEY] = kek
        vault = Vault(kek)
        org = app[org_http.ORG_KEY]
        # One lock per card account and one PIN counter, shared by the POS and the admin API.
        pos.accounts = accounts = pos.accounts or Accounts(ledger)
        pos.pins = pins = pos.pins or Pins(records, vault, pos.directory)
        app[terminal_http.TERMINALS_KEY] = TerminalAdmin(
            records, org, ledger, pos.directory, accounts
        )
        # The points engine first: a member's delete reads its cards' points through it.
        app[points_http.POINTS_KEY] = points = PointsService(
            records, org, ledger, pos.directory, accounts
        )
        app[members_http.MEMBERS_KEY] = MemberService(
            records, org, vault, ledger, accounts=accounts, directory=pos.directory,
            points_held=points.points_held, coupons_merge=CouponService.merge_member,
        )  # fmt: skip
        app[cards_admin_http.CARDS_KEY] = cards = CardService(
            records, org, vault, ledger, pos.directory, accounts, pins
        )
        pos.topup_grant = cards.pos_topup_grant
        cards.points_held, cards.forfeit_points = points.points_held, points.forfeit
        pos.reversers.append(cards.pos_topup_release)
        app[service_cards_http.SERVICE_CARDS_KEY] = services = ServiceCards(
            records, org, ledger, accounts
        )
        # A close and a member's delete refuse while a card holds a usable package.
        cards.services_held = app[members_http.MEMBERS_KEY].services_held = services.packages_held
        pos.features[Kind.SERVICE_REDEEM] = services.redeem
        pos.reversers.append(services.reverse)
        managers = ManagerCards(records, org, vault, pos.directory, pos.pin_of)
        app[manager_cards_http.MANAGER_CARDS_KEY] = managers
        pos.features[Kind.MANAGER_AUTH] = managers.authorize
        pos.reversers.append(managers.reverse)
        pos.points_round = points.after_money
        pos.features |= {
            Kind.POINTS_EARN: points.pos_earn,
            Kind.POINTS_REDEEM: points.pos_redeem,
            Kind.POINTS_RETURN: points.pos_return,
        }
        pos.reversers.append(points.reverse_pos)
        app.cleanup_ctx.extend((_points_expiry, _card_sweeps))
        coupons = CouponService(records, org, vault)
        app[coupons_http.COUPONS_KEY] = coupons
        for kind in (Kind.COUPON_QUERY, Kind.COUPON_RESERVE, Kind.COUPON_REDEEM,
                     Kind.COUPON_REVERSE):  # fmt: skip
            pos.features[kind] = coupons.pos
        pos.reversers.append(coupons.reverse_key)
        pos.rewards, pos.unreward, pos.reward_back, points.coupons = (
            coupons.rewards,
            coupons.void_rewards,
            coupons.rewards_back,
            coupons,  # a points redemption's coupon (points may not write coupon tables)
        )
        cards_http.add_routes(app.router)
    else:
        for method, path in (
            ("POST", "/internal/v1/pos"), ("POST", "/internal/v1/terminals"),
            ("POST", "/internal/v1/cards"), ("GET", "/internal/v1/kek"),
        ):  # fmt: skip
            app.router.add_route(method, path, _pos_disabled)
    return app


async def _points_expiry(app: web.Application) -> AsyncIterator[None]:
    """The points expiry job (and tier review) on a schedule, for as long as the app runs."""
    job = asyncio.create_task(
        app[points_http.POINTS_KEY].expire_on_schedule(
            limits.POINTS_EXPIRY_FIRST_S,
            limits.POINTS_EXPIRY_EVERY_S,
            limits.POINTS_REMINDER_DAYS_DEFAULT,
        )
    )
    yield
    job.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await job


async def _card_sweeps(app: web.Application) -> AsyncIterator[None]:
    """The card service's sweeps on a schedule: POS top-up grant spends of lapsed holds given
    back, and the fees of new cards never written."""
    job = asyncio.create_task(
        app[cards_admin_http.CARDS_KEY].sweeps_on_schedule(limits.TOPUP_GRANT_SWEEP_FIRST_S)
    )
    yield
    job.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await job


async def _pos_disabled(_request: web.Request) -> web.Response:
    raise ApiError(
        503, "pos_disabled", "no key-encrypting key configured (CARDCORE_KEK or kek_file)"
    )


async def _ledger_lifecycle(app: web.Application) -> AsyncIterator[None]:
    ledger = app[ledger_http.LEDGER_KEY]
    await ledger.start()
    yield
    await ledger.close()


@web.middleware
async def _edge_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Authorization, the one error shape for every failure, and request metrics."""
    route = request.match_info.route.resource
    name = route.canonical if route is not None else "unmatched"
    try:
        await _authorize(request)
        response = await handler(request)
    except ApiError as exc:
        response = error_response(exc.status, exc.code, exc.message, exc.field)
    except Refused as exc:
        response = error_response(exc.status, exc.code, exc.message, exc.field)
    except DATABASE_ERRORS:
        request.app[DB_ERRORS_KEY].log(request.method, name)
        response = error_response(
            503, "database_unavailable", "the database cannot answer now; retry", **RETRY
        )
    except web.HTTPRequestEntityTooLarge:
        response = error_response(
            413, "body_too_large", f"request body over {limits.REQUEST_BODY_BYTES_MAX} bytes"
        )
    except web.HTTPNotFound:
        response = error_response(404, "not_found", "no such route")
    except web.HTTPMethodNotAllowed as exc:
        response = error_response(
            405, "method_not_allowed", f"allowed: {sorted(exc.allowed_methods)}"
        )
    except web.HTTPException as exc:
        response = error_response(exc.status, "http_error", exc.reason)
    except Exception:
        log.exception("unhandled error in %s %s", request.method, name)
        response = error_response(500, "internal_error", "internal error; see the server log")
    request.app[METRICS_KEY].http_requests.labels(name, str(response.status)).inc()
    return response


async def _authorize(request: web.Request) -> None:
    """/internal routes need the internal token when one is configured; /v1 routes (but the
    OpenAPI document) a staff token, whose principal the handlers read; health, readiness
    and metrics are open."""
    path = request.path
    given = request.headers.get("Authorization", "")
    if path.startswith("/internal/"):
        token = request.app[CONFIG_KEY].internal_token
        if not token and not _loopback_host(request.host):
            # No token is allowed on a loopback listener only (config.check); a web page
            # whose name was made to resolve to 127.0.0.1 (DNS rebinding) sends its own
            # name as Host, and must not read or move what /internal serves.
            raise ApiError(421, "misdirected_request",
                           "without an internal token /internal answers loopback names only "
                           "(127.0.0.1, [::1], localhost)")  # fmt: skip
        expected = f"Bearer {token}"
        # aiohttp decodes headers with surrogateescape: encode them back the same way.
        if token and not hmac.compare_digest(
            given.encode("utf-8", "surrogateescape"), expected.encode()
        ):
            raise ApiError(401, "unauthorized", "missing or wrong bearer token")
    elif path.startswith("/v1/") and path != OPENAPI_PATH:
        scheme, _, secret = given.partition(" ")
        found = None
        if scheme.lower() == "bearer":
            found = await request.app[org_http.ORG_KEY].authenticate(secret.strip())
        if found is None:
            raise ApiError(401, "unauthorized", "missing, unknown, expired or revoked token")
        request[org_http.PRINCIPAL_KEY] = found


_LOOPBACK_HOST = re.compile(r"(?:127(?:\.[0-9]{1,3}){3}|\[::1\]|localhost)(?::[0-9]{1,5})?")


def _loopback_host(host: str) -> bool:
    """Whether a request's Host names this machine's loopback (an address or `localhost`)."""
    return _LOOPBACK_HOST.fullmatch(host.lower()) is not None


async def _healthz(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    """Ready: the writer runs and the database answers now (a writer whose database went
    away still runs, retrying: a load balancer must stop sending to it meanwhile)."""
    ledger = request.app[ledger_http.LEDGER_KEY]
    if not ledger.writer.ready:
        return error_response(503, "not_ready", "ledger writer is not running")
    try:
        async with asyncio.timeout(limits.READY_DATABASE_CHECK_MS / 1000):
            await ledger.store.ping()
    except (*DATABASE_ERRORS, TimeoutError):
        return error_response(503, "not_ready", "the database does not answer", **RETRY)
    return web.json_response({"status": "ready", "seq": ledger.writer.last_seq})


async def _metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[METRICS_KEY].registry)
    response = web.Response(body=body)
    response.content_type = CONTENT_TYPE_LATEST.split(";")[0]
    return response


def metrics_app(metrics: Metrics) -> web.Application:
    """Operator routes of a process without the ledger (`cardcore gateway`)."""
    app = web.Application()
    app[METRICS_KEY] = metrics

    async def metrics_route(_request: web.Request) -> web.Response:
        response = web.Response(body=generate_latest(metrics.registry))
        response.content_type = CONTENT_TYPE_LATEST.split(";")[0]
        return response

    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/metrics", metrics_route)
    return app
