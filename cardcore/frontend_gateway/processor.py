"""What the gateway does with one terminal message: decode, check, route, answer.

The processor owns the terminal sessions (working keys, MAC failures, one request in flight,
rate limit) and turns each decoded request into a host `PosRequest`, and the host's answer
into the 0x10 reply, MAC'd where the request was. It never raises for a message: every
failure becomes a response code (docs/card-protocol.md). It knows nothing of sockets.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from cardcore import limits
from cardcore.cards.model import BASKET_LINE, Kind, Outcome, PosRequest, PosResult
from cardcore.frontend_gateway import codec, security
from cardcore.frontend_gateway.host import Host, HostUnavailable
from cardcore.frontend_gateway.saf import ReversalQueue, SafFull
from cardcore.frontend_gateway.security import KeyMode, WorkingKeys
from cardcore.metrics import Metrics

log = logging.getLogger(__name__)

# --- response codes (field 39); docs/card-protocol.md lists what the terminal does on each --
APPROVED = "00"
CODE_OF_OUTCOME = {
    Outcome.APPROVED: "00",
    Outcome.PARTIAL_APPROVED: "10",  # split tender: F4 the amount taken, F54 the rest due
    Outcome.TERMINAL_UNKNOWN: "97",
    Outcome.TERMINAL_DISABLED: "03",
    Outcome.BATCH_MISMATCH: "77",
    Outcome.CARD_NOT_FOUND: "14",
    Outcome.CARD_NOT_ACTIVE: "62",  # restricted: not usable until activated (sold)
    Outcome.CARD_FROZEN: "62",  # restricted: an officer froze it
    Outcome.CARD_LOST: "41",  # lost card, pick up
    Outcome.CARD_CLOSED: "14",  # closed or replaced: the number is dead
    Outcome.CARD_EXPIRED: "54",
    Outcome.PIN_REQUIRED: "55",  # a card with a PIN, and no F52
    Outcome.PIN_WRONG: "55",
    Outcome.PIN_LOCKED: "75",  # allowable number of PIN tries exceeded
    Outcome.INSUFFICIENT_FUNDS: "51",
    Outcome.OVER_LIMIT: "61",
    Outcome.ORIGINAL_NOT_FOUND: "25",
    Outcome.ORIGINAL_MISMATCH: "64",
    Outcome.ALREADY_REVERSED: "12",
    Outcome.REFUND_EXCEEDS_ORIGINAL: "61",
    Outcome.REVERSED_BEFORE_ARRIVAL: "12",
    Outcome.BATCH_SETTLED: "12",  # a reversal too late: the batch is settled, refund instead
    Outcome.DUPLICATE_MISMATCH: "94",
    Outcome.FUNCTION_NOT_SUPPORTED: "40",
    Outcome.NOT_PERMITTED: "57",  # the rules refuse it; F48 tag RF names the rule
    Outcome.COUPON_UNKNOWN: "C1",
    Outcome.COUPON_USED: "C2",
    Outcome.COUPON_EXPIRED: "C3",
    Outcome.BAD_REQUEST: "30",
    Outcome.UNAVAILABLE: "96",
}
SIGN_ON_AGAIN = "77"
MAC_ERROR = "A0"
PIN_FORMAT_ERROR = "99"
SYSTEM_ERROR = "96"
SLOW_DOWN = "91"
INVALID_TRANSACTION = "12"
FORMAT_ERROR = "30"

# Field 60.3 of a sign-on: the key mode the terminal asks for.
KEY_MODE_OF_NET_CODE = {"003": KeyMode.TDES, "004": KeyMode.TDES, "005": KeyMode.AES}
NET_SIGN_ON = frozenset(KEY_MODE_OF_NET_CODE)
NET_SIGN_OFF = "002"
NET_ECHO = "301"
NET_SETTLE = "201"
NET_UPLOAD_DETAIL = "201"
NET_UPLOAD_END = frozenset({"202", "207"})

# (MTI, processing code) -> kind. Points, coupons, service and manager cards use private
# codes 90..98 (our own).
ROUTES: dict[tuple[str, str], Kind] = {
    ("0200", "310000"): Kind.INQUIRY,
    ("0200", "000000"): Kind.PURCHASE,
    ("0200", "200000"): Kind.VOID,
    ("0200", "630000"): Kind.TOPUP,
    ("0220", "630000"): Kind.TOPUP_CONFIRM,
    ("0220", "200000"): Kind.REFUND,
    ("0220", "000000"): Kind.PURCHASE,  # offline advice: done at the counter, now reported
    ("0200", "900000"): Kind.POINTS_EARN,
    ("0200", "910000"): Kind.POINTS_REDEEM,
    ("0200", "920000"): Kind.COUPON_QUERY,
    ("0200", "930000"): Kind.COUPON_REDEEM,
    ("0200", "940000"): Kind.COUPON_REVERSE,
    ("0200", "950000"): Kind.COUPON_RESERVE,
    ("0200", "960000"): Kind.SERVICE_REDEEM,
    ("0200", "970000"): Kind.MANAGER_AUTH,
    ("0200", "980000"): Kind.POINTS_RETURN,
}
# Kinds that move money or value (points, a coupon's use, entitlements, a manager's daily
# room): when the host does not answer, the gateway reverses them (so a 96 leaves nothing
# applied). A void, a top-up confirmation and a coupon reversal are not: each is safe to send
# again (by key), and undoing one would block its retry (a void of a voided sale) or keep the
# cash.
SAF_REVERSED = frozenset(
    {
        Kind.PURCHASE,
        Kind.TOPUP,
        Kind.REFUND,
        Kind.POINTS_EARN,
        Kind.POINTS_REDEEM,
        Kind.POINTS_RETURN,
        Kind.COUPON_RESERVE,
        Kind.COUPON_REDEEM,
        Kind.SERVICE_REDEEM,
        Kind.MANAGER_AUTH,
    }
)
# Kinds whose F4 is required and above zero (the amount moved, or the bill a rule looks at).
NEEDS_AMOUNT = frozenset(
    {
        Kind.PURCHASE,
        Kind.VOID,
        Kind.TOPUP,
        Kind.TOPUP_CONFIRM,
        Kind.REFUND,
        Kind.POINTS_EARN,
        Kind.POINTS_RETURN,
        Kind.COUPON_QUERY,
        Kind.COUPON_RESERVE,
        Kind.COUPON_REDEEM,
        Kind.MANAGER_AUTH,
    }
)
NEEDS_CARD = frozenset(
    {
        Kind.INQUIRY,
        Kind.PURCHASE,
        Kind.VOID,
        Kind.TOPUP,
        Kind.REFUND,
        Kind.POINTS_EARN,
        Kind.POINTS_REDEEM,
        Kind.POINTS_RETURN,
        Kind.SERVICE_REDEEM,
        Kind.MANAGER_AUTH,
    }
)
# Kinds that take a member card when the terminal has one (a coupon's holder and limits).
MAY_NAME_CARD = frozenset({Kind.COUPON_QUERY, Kind.COUPON_RESERVE, Kind.COUPON_REDEEM})
NEEDS_ORIGINAL = frozenset({Kind.VOID, Kind.TOPUP_CONFIRM, Kind.REFUND, Kind.COUPON_REVERSE})
# Kinds that name their original by its retrieval reference number (F37, 12 digits).
NEEDS_RRN = frozenset({Kind.REFUND, Kind.POINTS_RETURN})
# Kinds whose F48 is read as request TLV (section 6), and the tags some of them need.
READS_TLV = frozenset(
    {
        Kind.PURCHASE,
        Kind.REFUND,
        Kind.POINTS_EARN,
        Kind.POINTS_REDEEM,
        Kind.POINTS_RETURN,
        Kind.COUPON_QUERY,
        Kind.COUPON_RESERVE,
        Kind.COUPON_REDEEM,
        Kind.COUPON_REVERSE,
        Kind.SERVICE_REDEEM,
        Kind.MANAGER_AUTH,
    }
)
NEEDS_TLV: dict[Kind, str] = {  # kind -> the request field its required tag fills
    Kind.POINTS_REDEEM: "points",  # PT
    Kind.COUPON_QUERY: "coupon",  # CP
    Kind.COUPON_RESERVE: "coupon",
    Kind.COUPON_REDEEM: "coupon",
    Kind.MANAGER_AUTH: "discount",  # MD
}
# Fields a reply echoes from its request.
ECHOED = ("3", "4", "11", "25", "41", "42", "49", "60")
# What a reply's encoding need not check again: echoed, our own digits, the MAC placeholder.
_DECODED = frozenset({*ECHOED, "12", "13", "64"})


@dataclass(slots=True)
class Session:
    """A terminal's state in this gateway process, kept across its connections."""

    tid: str
    mid: str
    mode: KeyMode
    tmk: bytes = field(repr=False)
    keys: WorkingKeys | None = None
    # Keys sign-ons issued while the session held keys, newest last (at most
    # GATEWAY_PENDING_KEYS_MAX): the ones in use stay good until a request verifies under one
    # of these, which then takes their place. A sign-on under the terminal's id by anyone
    # else, who cannot read the keys, never takes the terminal's own keys away.
    next_keys: list[WorkingKeys] = field(default_factory=list, repr=False)
    mac_failures: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    queued: int = 0  # requests waiting for `lock` (each under its time limit)
    # Requests a second, and the burst (`Processor`: the setting); sign-ons apart, at their
    # own rate: anyone who knows a terminal's id and merchant id may send them, unMAC'd,
    # and they must never spend the terminal's budget for its sales.
    requests: Budget = field(default_factory=lambda: Budget(0.0))
    sign_ons: Budget = field(default_factory=lambda: Budget(limits.GATEWAY_SIGN_ONS_PER_S))


@dataclass(slots=True)
class Budget:
    """A token bucket: `rate_per_s` a second, as many at once; full at first."""

    rate_per_s: float
    tokens: float = field(init=False)
    refilled_at: float = 0.0

    def __post_init__(self) -> None:
        self.tokens = self.rate_per_s

    def take(self, now: float) -> bool:
        rate = self.rate_per_s
        self.tokens = min(rate, self.tokens + (now - self.refilled_at) * rate)
        self.refilled_at = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


@dataclass(frozen=True, slots=True)
class Reply:
    body: bytes
    processing: int = codec.PROCESSING_NONE  # header nibble: 3 = sign on again


class Processor:
    def __init__(
        self,
        host: Host,
        saf: ReversalQueue,
        kek: bytes,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.time,
        terminal_rate_per_s: int | None = None,  # GATEWAY_TERMINAL_RATE_PER_S
    ) -> None:
        self.host = host
        self.terminal_rate_per_s = terminal_rate_per_s or limits.GATEWAY_TERMINAL_RATE_PER_S
        self.saf = saf
        self.kek = kek
        self.zpk = security.zone_pin_key(kek)
        self.metrics = metrics
        self.clock = clock
        self.sessions: dict[str, Session] = {}
        self._unknown: dict[str, float] = {}  # terminal id -> until when it is known unknown
        self._time_second = -1
        self._time_fields = ("", "")
        self.draining = False  # shutting down: nothing new goes to the host
        # The labelled series each (MTI, response code) counts into: looked up once, not
        # per message (`labels` takes a lock and checks its values). MTIs are those
        # `codec.decode` accepts and codes this module's: a bounded set.
        self._series: dict[tuple[str, str], tuple[Any, Any]] = {}

    def drain(self) -> None:
        """Shutdown has begun (`GatewayServer.close`): from now on a request that would go to
        the host is answered 96 without going there. Requests already there finish as usual."""
        self.draining = True

    # --- entry ---------------------------------------------------------------------------------

    async def handle(self, body: bytes, bound: str | None = None) -> Reply | None:
        """The reply to one message, or None when there is nothing to answer (no MTI).
        `bound`: the terminal id the connection's client certificate names; a message
        naming another is answered 97 and touches nothing of that terminal's session."""
        try:
            fields = codec.decode(body)
        except codec.FormatError as exc:
            return self._format_error(exc)
        mti = fields["t"]
        started = time.perf_counter()
        try:
            reply, code = await self._dispatch(mti, fields, body, bound)
        except Exception:  # contained: a bug answers 96 to this terminal only
            log.exception("message handling failed", extra={"mti": mti})
            reply, code = self._reply(fields, SYSTEM_ERROR), SYSTEM_ERROR
        series = self._series.get((mti, code))
        if series is None:
            series = self._series[mti, code] = (
                self.metrics.gateway_messages.labels(mti, code),
                self.metrics.gateway_seconds.labels(mti),
            )
        series[0].inc()
        series[1].observe(time.perf_counter() - started)
        return reply

    def _format_error(self, exc: codec.FormatError) -> Reply | None:
        """The unMAC'd reply to a message that did not decode: MTI + 10 and the fields that
        could be recovered. None when there is no MTI, or the MTI has no response form (a
        response or a notification sent to us): nothing to answer."""
        if exc.mti is None:
            return None
        try:
            codec.response_mti(exc.mti)
        except ValueError:
            return None
        # An MTI we do not serve (12) is counted as "other": label values stay few.
        label = exc.mti if exc.mti in codec.MTIS else "other"
        self.metrics.gateway_messages.labels(label, exc.code).inc()
        fields = {"t": exc.mti, **exc.fields}
        return self._reply(fields, exc.code)

    async def _dispatch(
        self, mti: str, f: dict[str, str], body: bytes, bound: str | None = None
    ) -> tuple[Reply | None, str]:
        if mti in ("0210", "0230", "0330", "0410", "0510", "0810", "0830"):
            return None, INVALID_TRANSACTION  # a reply sent to us: nothing to answer
        tid = f.get("41")
        if tid is None or "11" not in f:
            return self._reply(f, FORMAT_ERROR), FORMAT_ERROR
        if not (tid.isascii() and tid.isalnum()):  # no terminal is registered under it
            return self._reply(f, "97"), "97"
        if bound is not None and tid != bound:  # another terminal's certificate: not its own
            return self._reply(f, "97"), "97"
        net = _net_code(f)
        if mti == "0800":
            return await self._sign_on(f, net)
        if mti == "0820":
            if net == NET_ECHO:
                return self._reply(f, APPROVED), APPROVED
            if net == NET_SIGN_OFF:
                return await self._sign_off(f, body)
            return self._reply(f, INVALID_TRANSACTION), INVALID_TRANSACTION
        session = self.sessions.get(tid)
        if session is None or session.keys is None:
            reply = self._reply(f, SIGN_ON_AGAIN, processing=codec.PROCESSING_SIGN_ON)
            return reply, SIGN_ON_AGAIN
        if not session.requests.take(time.monotonic()):
            return self._reply(f, SLOW_DOWN), SLOW_DOWN
        if not await self._turn(session):
            return self._reply(f, SYSTEM_ERROR), SYSTEM_ERROR
        try:
            return await self._in_session(session, mti, f, net, body)
        finally:
            session.lock.release()

    @staticmethod
    async def _turn(session: Session) -> bool:
        """Take the terminal's lock: one request in flight per terminal (a resend waits for
        the first to finish), and a sign-on or sign-off never changes the keys a request
        in flight was checked with and will be answered under. A lock that is free with
        nobody queued is taken at once, without a timer. False: not within
        `GATEWAY_IN_FLIGHT_WAIT_S` (the caller answers 96)."""
        if not (session.lock.locked() or session.queued):
            await session.lock.acquire()
            return True
        session.queued += 1
        try:
            async with asyncio.timeout(limits.GATEWAY_IN_FLIGHT_WAIT_S):
                await session.lock.acquire()
        except TimeoutError:
            return False
        finally:
            session.queued -= 1
        return True

    async def _in_session(
        self, s: Session, mti: str, f: dict[str, str], net: str, body: bytes
    ) -> tuple[Reply | None, str]:
        if s.keys is None:  # signed off (or MAC'd out) while this request waited its turn
            reply = self._reply(f, SIGN_ON_AGAIN, processing=codec.PROCESSING_SIGN_ON)
            return reply, SIGN_ON_AGAIN
        # 0200, 0220, 0400, 0500, 0320: MAC'd both ways.
        if not self._mac_ok(s, f, body):
            return self._mac_failed(s, f)
        s.mac_failures = 0
        if f.get("42") != s.mid:
            return self._reply(f, "03", keys=s), "03"
        if mti in ("0500", "0320"):
            if self.draining:
                return self._reply(f, SYSTEM_ERROR, keys=s), SYSTEM_ERROR
            if mti == "0500":
                return await self._settle(s, f)
            return await self._upload(s, f, net)
        if mti == "0400":
            return await self._reversal(s, f)
        kind = ROUTES.get((mti, f.get("3", "")))
        if kind is None:
            return self._reply(f, INVALID_TRANSACTION, keys=s), INVALID_TRANSACTION
        return await self._financial(s, f, kind)

    # --- network management ----------------------------------------------------------------------

    async def _sign_on(self, f: dict[str, str], net: str) -> tuple[Reply | None, str]:
        tid = f["41"]
        if net not in NET_SIGN_ON:
            return self._reply(f, INVALID_TRANSACTION), INVALID_TRANSACTION
        now = time.monotonic()
        if self._unknown.get(tid, 0.0) > now:  # asked the host a moment ago: still unknown
            return self._reply(f, "97"), "97"
        session = self.sessions.get(tid)
        if session is not None and not session.sign_ons.take(now):
            return self._reply(f, SLOW_DOWN), SLOW_DOWN  # sign-ons cost keys: rate-limited too
        if self.draining:
            return self._reply(f, SYSTEM_ERROR), SYSTEM_ERROR
        answer = await self._ask(PosRequest(kind=Kind.SIGN_ON, terminal=tid))
        code = CODE_OF_OUTCOME[answer.outcome]
        if answer.outcome is Outcome.TERMINAL_UNKNOWN:
            if len(self._unknown) >= limits.GATEWAY_UNKNOWN_TERMINALS_MAX:
                self._unknown = {k: v for k, v in self._unknown.items() if v > now}
            if len(self._unknown) < limits.GATEWAY_UNKNOWN_TERMINALS_MAX:
                self._unknown[tid] = now + limits.GATEWAY_UNKNOWN_TERMINAL_S
        if answer.outcome is not Outcome.APPROVED:
            return self._reply(f, code), code
        mode = KeyMode(answer.key_mode)
        if KEY_MODE_OF_NET_CODE[net] is not mode or f.get("42") != answer.mid:
            return self._reply(f, INVALID_TRANSACTION), INVALID_TRANSACTION
        tmk = security.unseal(self.kek, bytes.fromhex(answer.tmk_sealed), b"tmk:" + tid.encode())
        keys, payload = security.issue_working_keys(mode, tmk)
        held = await self._current(tid)  # its lock: no request of it in flight meanwhile
        if held is False:
            return self._reply(f, SYSTEM_ERROR), SYSTEM_ERROR
        try:
            session = held
            if session is None or session.mode is not mode or session.tmk != tmk:
                if session is not None and session.keys is not None:
                    self.metrics.gateway_signed_on.dec()  # the replaced session held keys
                    session.keys = None  # what waits on its lock is answered 77
                session = Session(tid=tid, mid=answer.mid, mode=mode, tmk=tmk,
                                  requests=Budget(float(self.terminal_rate_per_s)))  # fmt: skip
                self.sessions[tid] = session
            if session.keys is None:
                self.metrics.gateway_signed_on.inc()
                session.keys, session.mac_failures = keys, 0
            else:  # the keys in use stay good until a request verifies under these
                session.next_keys = [*session.next_keys, keys][-limits.GATEWAY_PENDING_KEYS_MAX :]
            extra = {
                "60": codec.format_f60(codec.Field60("00", answer.batch, net)),
                "62": payload.hex().upper(),
            }
            log.info("terminal signed on", extra={"terminal": tid, "key_mode": str(mode)})
            return self._reply(f, APPROVED, extra=extra), APPROVED
        finally:
            if held is not None:
                held.lock.release()

    async def _sign_off(self, f: dict[str, str], body: bytes) -> tuple[Reply | None, str]:
        """End the session's keys: only with a request MAC'd under them (anyone may know a
        terminal's id), answered MAC'd under them. A terminal without keys here is
        answered 00 unMAC'd: there is nothing to end."""
        session = await self._current(f["41"])  # after the request in flight, answered
        if session is False:  # under its keys
            return self._reply(f, SYSTEM_ERROR), SYSTEM_ERROR
        if session is None:
            return self._reply(f, APPROVED), APPROVED
        try:
            if session.keys is None:
                return self._reply(f, APPROVED), APPROVED
            if not self._mac_ok(session, f, body):
                return self._mac_failed(session, f)
            session.mac_failures = 0
            if f.get("42") != session.mid:
                return self._reply(f, "03", keys=session), "03"
            reply = self._reply(f, APPROVED, keys=session)  # under the keys it ends
            session.keys, session.next_keys = None, []  # the session's keys die with it
            self.metrics.gateway_signed_on.dec()
            return reply, APPROVED
        finally:
            session.lock.release()

    async def _current(self, tid: str) -> Session | Literal[False] | None:
        """The terminal's session, its lock held (`_turn`), as it is once the lock is taken:
        a sign-on that replaced the session while this waited is followed to the new one.
        None: no session (nothing to hold); False: not within the wait (answer 96)."""
        for _ in range(limits.GATEWAY_SESSION_TURNS_MAX):
            session = self.sessions.get(tid)
            if session is None:
                return None
            if not await self._turn(session):
                return False
            if self.sessions.get(tid) is session:
                return session
            session.lock.release()  # replaced meanwhile: the new one's turn
        return False

    # --- financial ------------------------------------------------------------------------------

    async def _financial(
        self, s: Session, f: dict[str, str], kind: Kind
    ) -> tuple[Reply | None, str]:
        request_or_code = self._pos_request(s, f, kind)
        if isinstance(request_or_code, str):
            return self._reply(f, request_or_code, keys=s), request_or_code
        request = request_or_code
        if self.draining:
            return await self._drained(s, f, request, kind)
        if kind not in SAF_REVERSED:
            try:
                result = (await self.host.pos([request]))[0]
            except HostUnavailable:
                result = PosResult(Outcome.UNAVAILABLE)
            return self._answer(s, f, result, kind)
        if self.saf.owes(s.tid, request.batch, request.stan):
            # A resend of a request the gateway is reversing: it must never be applied.
            return self._reply(f, INVALID_TRANSACTION, keys=s), INVALID_TRANSACTION
        if not self.saf.reserve():  # no room for the reversal a 96 would need
            return self._reply(f, SYSTEM_ERROR, keys=s), SYSTEM_ERROR
        reversal = PosRequest(
            kind=Kind.REVERSE,
            terminal=s.tid,
            batch=request.batch,
            stan=request.stan,
            date=request.date,
        )
        try:
            try:
                result = (await self.host.pos([request]))[0]
            except HostUnavailable:
                result = PosResult(Outcome.UNAVAILABLE)
            if result.outcome is not Outcome.UNAVAILABLE:
                reply, code = self._answer(s, f, result, kind)
                self.saf.release()
                return reply, code
        except asyncio.CancelledError:
            # Shutdown's bound cut the wait: the host may apply it, the terminal hears
            # nothing. Its reversal is stored before the task ends.
            await self._store_cut(reversal, reserved=True)
            raise
        except Exception:  # after the host may have applied it: reverse, as on a 96
            log.exception("financial request failed", extra={"terminal": s.tid})
        if not await self._stored(reversal, reserved=True):
            # No reversal on disk: answer nothing, so the terminal reverses by itself.
            log.critical(
                "store-and-forward refused a reversal: no answer sent",
                extra={"terminal": s.tid, "batch": request.batch, "stan": request.stan},
            )
            return None, SYSTEM_ERROR
        return self._reply(f, SYSTEM_ERROR, keys=s), SYSTEM_ERROR

    async def _drained(
        self, s: Session, f: dict[str, str], request: PosRequest, kind: Kind
    ) -> tuple[Reply | None, str]:
        """A financial request read once shutdown began: not sent to the host, answered 96.
        It may be the resend of an original still at the host, or applied there with its
        reply lost (a resend waits for its original's turn): a 96 says "reversed if done",
        so the reversal is stored first, as on any 96 (a reversal of a request the host
        never took only leaves its tombstone). No room for it: no answer, and the terminal
        reverses by itself."""
        if kind in SAF_REVERSED:
            reversal = PosRequest(
                kind=Kind.REVERSE, terminal=s.tid, batch=request.batch, stan=request.stan,
                date=request.date,
            )  # fmt: skip
            if not self.saf.reserve() or not await self._stored(reversal, reserved=True):
                log.critical(
                    "shutting down: no reversal stored for a request: no answer sent",
                    extra={"terminal": s.tid, "batch": request.batch, "stan": request.stan},
                )
                return None, SYSTEM_ERROR
        return self._reply(f, SYSTEM_ERROR, keys=s), SYSTEM_ERROR

    async def _stored(self, reversal: PosRequest, *, reserved: bool) -> bool:
        """Whether `reversal` is now on disk (False: no room, or the file failed). The write
        runs in its own task: a caller cancelled by shutdown's bound does not stop it (the
        store is closed only after every connection has ended)."""
        write = asyncio.ensure_future(self.saf.add(reversal, reserved=reserved))
        write.add_done_callback(_retrieve)
        try:
            await asyncio.shield(write)
        except SafFull:
            return False
        return True

    async def _store_cut(self, reversal: PosRequest, *, reserved: bool) -> None:
        """Store the reversal of a request shutdown cut off at the host (its caller is being
        cancelled, and re-raises)."""
        where = {"terminal": reversal.terminal, "batch": reversal.batch, "stan": reversal.stan}
        if await self._stored(reversal, reserved=reserved):
            log.warning("shutdown cut a request at the host: reversal stored", extra=where)
        else:
            log.critical("shutdown cut a request at the host: reversal not stored", extra=where)

    def _answer(
        self, s: Session, f: dict[str, str], result: PosResult, kind: Kind | None = None
    ) -> tuple[Reply | None, str]:
        code = CODE_OF_OUTCOME[result.outcome]
        extra: dict[str, str] = {}
        if result.outcome is Outcome.PARTIAL_APPROVED and result.amount is not None:
            extra["4"] = f"{result.amount:012d}"  # the amount taken, not the amount asked
        if result.rrn:
            extra["37"] = result.rrn
        if result.auth_code:
            extra["38"] = result.auth_code
        if result.amount is not None and kind is Kind.POINTS_REDEEM and result.amount >= 0:
            extra["4"] = f"{result.amount:012d}"  # the money the points paid
        tlv = _reply_tlv(result)
        if tlv:
            extra["48"] = tlv
        amounts = []
        if result.balance is not None and abs(result.balance) < 10**codec.AMOUNT_DIGITS:
            amounts.append(codec.format_balance(result.balance))  # else left out
        if result.remainder is not None:
            amounts.append(codec.format_amount(codec.AMOUNT_TYPE_DUE, result.remainder))
        if amounts:
            extra["54"] = "".join(amounts)
        return self._reply(f, code, keys=s, extra=extra, processing=_processing(result)), code

    def _pos_request(self, s: Session, f: dict[str, str], kind: Kind) -> PosRequest | str:
        """The host request for a financial message, or the response code refusing it."""
        f60 = _f60(f)
        if f60 is None:
            return FORMAT_ERROR
        amount = 0
        if kind in NEEDS_AMOUNT:
            if "4" not in f:
                return FORMAT_ERROR
            amount = int(f["4"])
            if amount <= 0:
                return "13"
        pan = ""
        if kind in NEEDS_CARD or kind in MAY_NAME_CARD:
            pan = f.get("2") or f.get("35", "").split("=")[0]
            if not pan and kind in NEEDS_CARD:
                return "14"
        original_batch = original_stan = ""
        if kind in NEEDS_ORIGINAL:
            if "61" not in f:
                return FORMAT_ERROR
            try:
                f61 = codec.parse_f61(f["61"])
            except codec.FormatError:
                return FORMAT_ERROR
            original_batch, original_stan = f61.batch, f61.stan
        rrn = ""
        if kind in NEEDS_RRN:
            rrn = f.get("37", "")
            if len(rrn) != 12 or not rrn.isdigit():
                return FORMAT_ERROR
        data = _request_data(f.get("48", "")) if kind in READS_TLV else {}
        if data is None or (kind in NEEDS_TLV and NEEDS_TLV[kind] not in data):
            return FORMAT_ERROR
        pin_block = ""
        if "52" in f:
            assert s.keys is not None
            try:
                zone = security.translate_pin_block(
                    s.mode, bytes.fromhex(f["52"]), pan, s.keys.pik, self.zpk
                )
            except security.SecurityError:
                return PIN_FORMAT_ERROR
            pin_block = zone.hex().upper()
        return PosRequest(
            kind=kind,
            terminal=s.tid,
            batch=f60.batch,
            stan=f["11"],
            card=pan,
            amount=amount,
            original_batch=original_batch,
            original_stan=original_stan,
            rrn=rrn,
            operator=f.get("63", "")[:3].strip(),
            date=f.get("13", ""),
            pin_block=pin_block,
            # An online purchase from a terminal that takes partial approvals (F60.6 = 1); an
            # offline advice was done at the counter in full: it is never split.
            partial=kind is Kind.PURCHASE and f["t"] == "0200" and f60.partial_approval,
            **data,
        )

    async def _reversal(self, s: Session, f: dict[str, str]) -> tuple[Reply | None, str]:
        """0400: undo batch + STAN of the original, exactly once, whatever the order. Stored
        and forwarded when the host does not answer: the terminal hears 00 either way."""
        f60 = _f60(f)
        if f60 is None:
            return self._reply(f, FORMAT_ERROR, keys=s), FORMAT_ERROR
        if self.draining:
            return self._reply(f, SYSTEM_ERROR, keys=s), SYSTEM_ERROR
        request = PosRequest(
            kind=Kind.REVERSE, terminal=s.tid, batch=f60.batch, stan=f["11"], date=f.get("13", "")
        )
        try:
            result = (await self.host.pos([request]))[0]
        except HostUnavailable:
            result = PosResult(Outcome.UNAVAILABLE)
        except asyncio.CancelledError:  # shutdown's bound: the gateway delivers it later
            await self._store_cut(request, reserved=False)
            raise
        if result.outcome is Outcome.UNAVAILABLE:
            if not await self._stored(request, reserved=False):
                # Not stored: answer nothing; the terminal keeps its reversal and sends it again.
                log.critical("store-and-forward refused a reversal", extra={"terminal": s.tid})
                return None, SYSTEM_ERROR
            return self._reply(f, APPROVED, keys=s), APPROVED
        code = CODE_OF_OUTCOME[result.outcome]
        return self._reply(f, code, keys=s), code

    # --- settlement ---------------------------------------------------------------------------

    async def _settle(self, s: Session, f: dict[str, str]) -> tuple[Reply | None, str]:
        f60 = _f60(f)
        if f60 is None or "48" not in f:
            return self._reply(f, FORMAT_ERROR, keys=s), FORMAT_ERROR
        if self.saf.owes_terminal(s.tid):  # its batch is not final until they are delivered
            return self._reply(f, SYSTEM_ERROR, keys=s), SYSTEM_ERROR
        totals = _totals(f["48"])
        if totals is None:
            return self._reply(f, FORMAT_ERROR, keys=s), FORMAT_ERROR
        request = PosRequest(
            kind=Kind.SETTLE, terminal=s.tid, batch=f60.batch, stan=f["11"], totals=totals
        )
        result = await self._ask(request)
        code = CODE_OF_OUTCOME[result.outcome]
        if result.outcome is not Outcome.APPROVED or result.totals is None:
            return self._reply(f, code, keys=s, processing=_processing(result)), code
        debit_amount, debit_count, credit_amount, credit_count = result.totals
        # Three digits carry a count: modulo 1000, as the host compares them.
        host = codec.Totals(debit_amount, debit_count % 1000, credit_amount, credit_count % 1000)
        flag = "1" if result.balanced else "2"
        reply = self._reply(f, APPROVED, keys=s, extra={"48": codec.format_totals(host, flag)})
        return reply, APPROVED

    async def _upload(self, s: Session, f: dict[str, str], net: str) -> tuple[Reply | None, str]:
        f60 = _f60(f)
        if f60 is None:
            return self._reply(f, FORMAT_ERROR, keys=s), FORMAT_ERROR
        if net in NET_UPLOAD_END:
            if self.saf.owes_terminal(s.tid):
                return self._reply(f, SYSTEM_ERROR, keys=s), SYSTEM_ERROR
            totals = _totals(f["48"]) if "48" in f else (0, 0, 0, 0)
            if totals is None:
                return self._reply(f, FORMAT_ERROR, keys=s), FORMAT_ERROR
            request = PosRequest(
                kind=Kind.UPLOAD, terminal=s.tid, batch=f60.batch, stan=f["11"], totals=totals
            )
        elif net == NET_UPLOAD_DETAIL:
            lines = _upload_lines(f.get("48", ""))
            if lines is None:
                return self._reply(f, FORMAT_ERROR, keys=s), FORMAT_ERROR
            request = PosRequest(
                kind=Kind.UPLOAD, terminal=s.tid, batch=f60.batch, stan=f["11"], lines=lines
            )
        else:
            return self._reply(f, INVALID_TRANSACTION, keys=s), INVALID_TRANSACTION
        result = await self._ask(request)
        code = CODE_OF_OUTCOME[result.outcome]
        extra = {}
        if result.unmatched:
            extra["48"] = "".join(result.unmatched)
        return self._reply(f, code, keys=s, extra=extra, processing=_processing(result)), code

    # --- helpers --------------------------------------------------------------------------------

    async def _ask(self, request: PosRequest) -> PosResult:
        try:
            return (await self.host.pos([request]))[0]
        except HostUnavailable:
            return PosResult(Outcome.UNAVAILABLE)

    def _mac_ok(self, s: Session, f: dict[str, str], body: bytes) -> bool:
        """The MAC over the bytes as received (F64 is the message's last field)."""
        assert s.keys is not None
        tag = f.get("64")
        if tag is None:
            return False
        data, mac = codec.mac_input(body), bytes.fromhex(tag)
        if s.keys.verify(s.mode, data, mac):
            return True
        for keys in reversed(s.next_keys):
            if keys.verify(s.mode, data, mac):  # the terminal took these new keys
                s.keys, s.next_keys, s.mac_failures = keys, [], 0
                return True
        return False

    def _mac_failed(self, s: Session, f: dict[str, str]) -> tuple[Reply | None, str]:
        self.metrics.gateway_mac_failures.inc()
        s.mac_failures += 1
        if s.mac_failures >= limits.GATEWAY_MAC_FAILURES_MAX:
            log.warning("terminal must sign on again after MAC failures", extra={"terminal": s.tid})
            if s.keys is not None:
                self.metrics.gateway_signed_on.dec()
            s.keys, s.next_keys, s.mac_failures = None, [], 0
            return self._reply(f, MAC_ERROR, processing=codec.PROCESSING_SIGN_ON), MAC_ERROR
        return self._reply(f, MAC_ERROR), MAC_ERROR

    def _reply(
        self,
        request: dict[str, str],
        code: str,
        *,
        keys: Session | None = None,
        extra: dict[str, str] | None = None,
        processing: int = codec.PROCESSING_NONE,
    ) -> Reply:
        """The 0x10 reply: MTI + 10, the echoed fields, host date and time, F39, `extra`,
        and a MAC under the session's key when `keys` is given and signed on."""
        fields = {"t": codec.response_mti(request["t"])}
        for name in ECHOED:  # every request field reached us through codec.decode
            if name in request:
                fields[name] = request[name]
        fields["12"], fields["13"] = self._host_time()
        fields["39"] = code
        extra = extra or {}
        fields.update(extra)
        decoded = _DECODED.difference(extra)
        if keys is None or keys.keys is None:
            return Reply(codec.encode(fields, decoded=decoded), processing)
        fields["64"] = codec.MAC_PLACEHOLDER
        body = codec.encode(fields, decoded=decoded)
        tag = keys.keys.tag(keys.mode, codec.mac_input(body))
        return Reply(codec.set_mac(body, tag), processing)

    def _host_time(self) -> tuple[str, str]:
        """F12 hhmmss and F13 MMDD on the host's clock (Asia/Shanghai), made once a second."""
        second = int(self.clock())
        if second != self._time_second:
            now = time.gmtime(second + 8 * 3600)
            self._time_second = second
            self._time_fields = (time.strftime("%H%M%S", now), time.strftime("%m%d", now))
        return self._time_fields


def _retrieve(write: asyncio.Future[None]) -> None:
    """Mark a store-and-forward write's outcome as seen, so that asyncio does not report the
    failure of one whose caller was cancelled meanwhile (the store logs a failed write)."""
    if not write.cancelled():
        write.exception()


def _processing(result: PosResult) -> int:
    """The header nibble of a reply: 3 (sign on again) when the batch is not the host's."""
    if result.outcome is Outcome.BATCH_MISMATCH:
        return codec.PROCESSING_SIGN_ON
    return codec.PROCESSING_NONE


def _net_code(f: dict[str, str]) -> str:
    parsed = _f60(f)
    return parsed.net_code if parsed is not None else ""


def _f60(f: dict[str, str]) -> codec.Field60 | None:
    if "60" not in f:
        return None
    try:
        return codec.parse_f60(f["60"])
    except codec.FormatError:
        return None


_CODE = re.compile(r"[A-Za-z0-9_.-]{1,32}")
# MR: no longer than a manager card's reasons can be (longer is 30, never 57)
_REASON = re.compile(rf"[a-z][a-z0-9_]{{0,{limits.MANAGER_REASON_CHARS_MAX - 1}}}")
_SHORT_TEXT = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # a campaign or refusal code in a reply


def _request_data(value: str) -> dict[str, Any] | None:
    """The issue-5 fields of a request's F48 TLV, checked (None: malformed, answered 30).
    Tags a request does not use are skipped, as a terminal skips tags it does not know."""
    try:
        items = codec.tlv_decode(value)
    except codec.FormatError:
        return None
    out: dict[str, Any] = {}
    basket: list[tuple[str, int]] = []
    seen: set[str] = set()
    for tag, item in items:
        if tag == codec.TLV_BASKET_LINE:
            department, _, fen = item.partition("=")
            if not BASKET_LINE.fullmatch(department) or not _amount_ok(fen):
                return None
            basket.append((department, int(fen)))
            continue
        if tag in seen:
            return None  # each other tag at most once
        seen.add(tag)
        if tag == codec.TLV_COUPON:
            if not 1 <= len(item) <= limits.COUPON_QR_CHARS_MAX:
                return None
            out["coupon"] = item
        elif tag == codec.TLV_POINTS:
            if not _number_ok(item, limits.POINTS_PER_TXN_MAX, low=1):
                return None
            out["points"] = int(item)
        elif tag == codec.TLV_PRODUCT:
            if not _CODE.fullmatch(item):
                return None
            out["product"] = item
        elif tag == codec.TLV_USES:
            if not _number_ok(item, limits.SERVICE_USES_MAX, low=1):
                return None
            out["uses"] = int(item)
        elif tag == codec.TLV_REASON:
            if not _REASON.fullmatch(item):
                return None
            out["reason"] = item
        elif tag == codec.TLV_SALE:
            if not _CODE.fullmatch(item) or len(item) > limits.POS_SALE_CHARS_MAX:
                return None
            out["sale"] = item
        elif tag == codec.TLV_MANAGER_DISCOUNT:
            if not _number_ok(item, limits.POS_AMOUNT_MAX, low=1):
                return None
            out["discount"] = int(item)
    if len(basket) > limits.POS_BASKET_LINES_MAX:
        return None
    if basket:
        out["basket"] = tuple(basket)
    return out


def _number_ok(text: str, high: int, *, low: int = 0) -> bool:
    return (
        0 < len(text) <= len(str(high))
        and text.isascii()
        and text.isdigit()
        and low <= int(text) <= high
    )


def _amount_ok(text: str) -> bool:
    return _number_ok(text, limits.POS_AMOUNT_MAX)


def _reply_tlv(result: PosResult) -> str:
    """F48 of a reply: what the host answered beyond the amount and the balance."""
    items: list[tuple[str, str]] = []
    if result.discount_bp is not None:
        items.append((codec.TLV_DISCOUNT_BP, str(result.discount_bp)))
    numbers = (
        (codec.TLV_POINTS, result.points),
        (codec.TLV_POINTS_BALANCE, result.points_balance),
        (codec.TLV_DISCOUNT, result.discount),
        (codec.TLV_FORFEITED, result.forfeited),
        (codec.TLV_USES_LEFT, result.uses_left),
    )
    items += [(tag, str(value)) for tag, value in numbers if value is not None]
    for tag, text in ((codec.TLV_CAMPAIGN, result.campaign), (codec.TLV_REFUSAL, result.refusal)):
        if text and _SHORT_TEXT.fullmatch(text):
            items.append((tag, text))
    items += [(codec.TLV_REWARD, code) for code in result.rewards if _SHORT_TEXT.fullmatch(code)]
    return codec.tlv_encode(items) if items else ""


def _totals(value: str) -> tuple[int, int, int, int] | None:
    """Settlement totals of a request's F48 as the host takes them, or None when malformed
    (the flag not 0 included)."""
    try:
        t = codec.parse_request_totals(value)
    except codec.FormatError:
        return None
    return (t.debit_amount, t.debit_count, t.credit_amount, t.credit_count)


def _upload_lines(value: str) -> tuple[tuple[str, int], ...] | None:
    """Batch-upload detail in F48: up to eight lines of STAN n6 + amount n12."""
    size = len(value)
    if not size or size % 18 or size > limits.GATEWAY_UPLOAD_LINES_MAX * 18 or not value.isdigit():
        return None
    return tuple((value[i : i + 6], int(value[i + 6 : i + 18])) for i in range(0, len(value), 18))
