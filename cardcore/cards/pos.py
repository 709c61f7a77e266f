"""The POS use cases: what the host does with each request the front-end gateway forwards.

`PosService.handle` takes many terminals' requests at once (the gateway batches them): the
feature requests (below) are answered by their services, all at once, while the others are
planned (terminal, card, original transfer read), turned into at most one ledger operation
each and submitted to the writer in one call, so they share a group commit. Each request is
answered with an `Outcome`. Coupons, service and manager cards are answered by their own
services (`features`, registered by the application); a reversal the ledger took also asks
each feature to undo what it did under the reversed key (`reversers`), never one it refused.

Cards. A card that is not active is declined with its state's outcome (frozen, lost, closed
or replaced, not yet active); money may still go back to a frozen or lost card (a void, a
refund: it stays on the card's account), never to a closed or replaced one; a reversal never
looks at the card. A card with a PIN needs it for a purchase (and has it checked whenever a
request carries one): the gateway's zone PIN block is read by the injected `pin_of`, the
count of wrong PINs and the lockout live in the database (`Pins.check`).

Money. A purchase or top-up runs under its card account's lock (`Accounts.lock`), taken for
every account of one `handle` call in ascending id order (no deadlock between calls) and held
until the ledger answered, so a check against the balance still holds when the operation is
applied: a top-up against the class maximum, a split tender (a purchase larger than the
balance, from a terminal that takes partial approvals, takes what the card has and answers
the remainder). Amounts already planned in the same call count too. Across legal entities
the value moves through the due-to / due-from clearing pair (`model.value_postings`).

Points (ADR 0007). After the money of one call is decided, its approved purchases, voids and
refunds of cards get their points in one more submit, under the same card locks (voids and
refunds lock their card too: a clawback reads the lots it takes from): `points_round`, set by
the application to the points engine. POINTS_EARN, POINTS_REDEEM and POINTS_RETURN (the
return of goods a POINTS_EARN earned on) are answered by the points engine through
`features`, and its reverser undoes the points of a reversed key.

Resends. A purchase or top-up the host would decline (the card frozen since, its PIN locked,
a partial amount computed anew) is first looked up under its key: when the ledger already
took it, the request is a resend and gets the ledger's stored answer.

One key, one function. A key (terminal, batch cycle, batch, STAN) is one transaction,
whatever function it is sent with: the ledger keeps the keys of money requests, and feature
requests claim theirs in `pos_claims` (`_key_conflicts`, one read per call; `_claim`, written
while the call's money goes on). A request under a key used for another function is answered
94 and changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from cardcore import limits
from cardcore.cards.accounts import Accounts, AccountsUnavailable
from cardcore.cards.directory import Directory
from cardcore.cards.model import (
    CURRENCY,
    FEATURE_KINDS,
    GIVE_BACK_STATES,
    POS_CLIENT,
    Card,
    CardClass,
    CardState,
    Kind,
    Outcome,
    PosRequest,
    PosResult,
    Settlement,
    Terminal,
    auth_code_of,
    batch_prefix,
    batch_totals,
    luhn_ok,
    may_have_claims,
    next_batch,
    outcome_of_state,
    reversal_key,
    rrn_of,
    stans_of,
    transaction_key,
    unusable_outcome,
    value_postings,
)
from cardcore.cards.pins import PinCheck, Pins
from cardcore.db import DATABASE_ERRORS
from cardcore.ledger.model import (
    Account,
    Balance,
    CreateTransfer,
    Metadata,
    Op,
    Posting,
    PostPending,
    Refund,
    Result,
    Reverse,
    Side,
    VoidPending,
)
from cardcore.ledger.service import Ledger
from cardcore.ledger.writer import Busy, LedgerUnavailable

log = logging.getLogger(__name__)

# A feature service's answer to one POS request of its kinds (coupons, service and manager
# cards): the request, its terminal, its key (terminal, batch cycle, batch, STAN) and the
# request's card when it names one (found, active, its PIN checked when sent); None for a
# manager authorization, whose F2 is the manager's own card.
FeatureHandler = Callable[[PosRequest, Terminal, str, Card | None], Awaitable[PosResult]]
# What a feature undid under a POS key when its terminal reverses it (idempotent).
FeatureReverser = Callable[[Terminal, str], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class MoneyDone:
    """An approved purchase, void or refund of a card, for the points round: its request,
    terminal, card, POS key, the fen that moved, (void, refund) the purchase's key, and
    whether this call's ledger submit made its transfer (not a replay): then nothing can be
    pinned under its key yet."""

    request: PosRequest
    terminal: Terminal
    card: Card
    key: str
    amount: int
    original_key: str = ""
    fresh: bool = False


@dataclass(frozen=True, slots=True)
class PointsAnswer:
    """What the points round adds to an approval (ok False: it could not be decided now)."""

    points: int | None
    points_balance: int | None
    ok: bool = True


# The points engine's round after the money (ADR 0007): one answer (or None) per item.
PointsRound = Callable[[Sequence[MoneyDone]], Awaitable[list[PointsAnswer | None]]]
# The instant reward of an approved purchase (the campaign card): the coupon codes it earned,
# issued to the card's member under the purchase's key (a resend gets the same codes).
RewardRound = Callable[[Terminal, str, Card, int], Awaitable[tuple[str, ...]]]


# A top-up's spend of its store's stored-value grant: (store, card class, amount, key=the
# top-up's key, hold_id=its hold) -> "" when spent, else the refusal (not_granted, ...).
class TopupGrant(Protocol):
    def __call__(
        self, store: str, class_code: str, amount: int, *, key: str, hold_id: int
    ) -> Awaitable[str]: ...


# Kinds that are purchases: an approved one may earn an instant reward.
REWARDED = frozenset({Kind.PURCHASE, Kind.POINTS_EARN})
# Kinds the points engine answers through `features` (POINTS_EARN, POINTS_REDEEM,
# POINTS_RETURN).
POINTS_KINDS = frozenset({Kind.POINTS_EARN, Kind.POINTS_REDEEM, Kind.POINTS_RETURN})
# Feature kinds that take something back from the card: its card is taken as a refund's is
# (frozen, lost or expired too), or what it earned before would stay on it.
TAKING_BACK = frozenset({Kind.POINTS_RETURN})

# Ledger result codes (and the original codes of id_already_failed) -> outcomes.
_OUTCOME_OF_CODE = {
    "exceeds_credits": Outcome.INSUFFICIENT_FUNDS,
    "debit_account_frozen": Outcome.CARD_FROZEN,
    "credit_account_frozen": Outcome.CARD_FROZEN,
    "target_not_found": Outcome.ORIGINAL_NOT_FOUND,
    "target_failed": Outcome.ORIGINAL_NOT_FOUND,
    "target_not_reversible": Outcome.ORIGINAL_NOT_FOUND,
    "target_already_reversed": Outcome.ALREADY_REVERSED,
    "target_already_refunded": Outcome.ALREADY_REVERSED,
    "target_partly_refunded": Outcome.ALREADY_REVERSED,  # a void is of the whole sale
    "exceeds_refundable_amount": Outcome.REFUND_EXCEEDS_ORIGINAL,
    "reversed_before_arrival": Outcome.REVERSED_BEFORE_ARRIVAL,
    "pending_transfer_not_found": Outcome.ORIGINAL_NOT_FOUND,
    # a second confirmation under another STAN: the terminal must not count it again
    "pending_transfer_already_posted": Outcome.ALREADY_REVERSED,
    "pending_transfer_already_voided": Outcome.ALREADY_REVERSED,
    "pending_transfer_expired": Outcome.ORIGINAL_NOT_FOUND,
    "exceeds_debits": Outcome.OVER_LIMIT,
    "overflows_balance": Outcome.OVER_LIMIT,
}


# Requests whose replayed approval is declined when a reversal undid the first attempt.
UNDOABLE = frozenset({Kind.PURCHASE, Kind.TOPUP, Kind.REFUND, Kind.VOID, Kind.TOPUP_CONFIRM})
# Answers that approve (with a reference): a replay of one may meet a reversal since.
APPROVALS = frozenset({Outcome.APPROVED, Outcome.PARTIAL_APPROVED})
# Requests that move money onto or off a card under its account's lock.
GUARDED = frozenset({Kind.PURCHASE, Kind.TOPUP})
# Requests whose points round takes points back (under the card account's lock too).
_CLAWING = (Kind.VOID, Kind.REFUND)
# The functions a feature request claims its key for (`PosService._key_conflicts`): the
# coupon messages are one function (a redeem under its reservation's STAN confirms it).
CLAIMED = {
    Kind.COUPON_RESERVE: "coupon",
    Kind.COUPON_REDEEM: "coupon",
    Kind.COUPON_REVERSE: "coupon",
    Kind.SERVICE_REDEEM: "service",
    Kind.MANAGER_AUTH: "manager",
    Kind.POINTS_EARN: "points_earn",
    Kind.POINTS_REDEEM: "points_redeem",
    Kind.POINTS_RETURN: "points_return",
}
# A top-up hold its grant refused is voided under its key + this, the reason naming the
# refusal (`PosService._granted`, `_grant_refusal`).
GRANT_VOID_SUFFIX = "/G"
GRANT_VOID_REASON = "grant:"
UNAVAILABLE_REFUSAL = "unavailable"
# Requests the ledger keeps under their own key: checked against the claims.
_KEPT_BY_LEDGER = frozenset({Kind.PURCHASE, Kind.TOPUP, Kind.TOPUP_CONFIRM, Kind.VOID, Kind.REFUND})
# The ledger's answer to a resend whose planned amount is not the stored one (a split
# tender computed anew): the stored transfer decides.
# What the ledger answers a purchase's resend whose postings (the balance moved since) or
# card metadata (its class or discount changed since) are worked out again differently.
_OTHER_CONTENT = frozenset({"exists_with_different_postings", "exists_with_different_metadata"})
_CARD_METADATA = ("card_class", "discount_bp")  # what `_card_metadata` adds
# Counts in settlement totals are three digits on the wire: compared modulo 1000.
COUNT_MODULUS = 1000


def card_token(token_key: bytes, pan: str) -> str:
    """The keyed hash a card is found by: the PAN itself is never stored or logged."""
    return hmac.new(token_key, pan.encode("ascii"), hashlib.sha256).hexdigest()


def token_key_of(kek: bytes) -> bytes:
    return hmac.new(kek, b"cardcore/card-token/v1", hashlib.sha256).digest()


@dataclass(frozen=True, slots=True)
class _Money:
    """What a purchase or top-up needs once its card's lock is held."""

    clearing: tuple[int, int] | None  # (due_to, due_from) across legal entities
    extra: dict[str, str]  # the card's metadata (class, discount)
    limit: int = 0  # top-up: the most the card may hold, in fen (0: no maximum)
    needs_balance: bool = False  # a split tender or a maximum: read the balance first


@dataclass(slots=True)
class _Plan:
    """One request on its way: an answer already, or an op whose result makes the answer."""

    request: PosRequest
    answer: PosResult | None = None
    op: Op | None = None
    card: Card | None = None
    finish: Callable[[Result], PosResult] | None = None
    terminal: Terminal | None = None
    money: _Money | None = None
    result: Result | None = None
    resend: bool = False  # a host decline of a purchase or top-up: the ledger may hold it
    from_stored: bool = False  # its op repeats the transfer stored under its key
    original_key: str = ""  # void, refund: the purchase's ledger key; reversal: its target
    voided_key: str = ""  # the reversal of a void: the key of the purchase it voided
    credit_limit: int = 0  # a new void or refund: the most its card may hold (0: none)


class PosService:
    def __init__(
        self,
        ledger: Ledger,
        directory: Directory,
        token_key: bytes,
        clock_ms: Callable[[], int] | None = None,
        *,
        pin_of: Callable[[str, str], str] | None = None,
        accounts: Accounts | None = None,
        pins: Pins | None = None,
    ) -> None:
        self.ledger = ledger
        self.directory = directory
        self.token_key = token_key
        self.clock_ms = clock_ms or (lambda: int(time.time() * 1000))
        # (PAN, zone PIN block hex) -> PIN digits; ValueError when the block does not read.
        self.pin_of = pin_of
        # Shared with the admin services when the application sets them: one lock per card
        # account for both, one PIN counter. Without accounts the service makes its own.
        self.accounts: Accounts | None = accounts
        self.pins: Pins | None = pins
        self._terminal_locks: dict[str, asyncio.Lock] = {}
        # Registered by the application for the feature kinds (model.FEATURE_KINDS).
        self.features: dict[Kind, FeatureHandler] = {}
        self.reversers: list[FeatureReverser] = []
        # Registered by the application: points of approved purchases, voids and refunds.
        self.points_round: PointsRound | None = None
        self.rewards: RewardRound | None = None
        # Registered by the application: takes back the unused instant rewards of a purchase
        # (its key) that a void (its key) cancelled, and gives them back when that void is
        # reversed.
        self.unreward: Callable[[str, str], Awaitable[None]] | None = None
        self.reward_back: Callable[[str, str], Awaitable[None]] | None = None
        # Registered by the application: spends a top-up's amount from the stored-value grant
        # of (store, card class), recorded by the top-up's key and hold (given back when the
        # hold ends without its value staying); "" when it did, else the refusal.
        self.topup_grant: TopupGrant | None = None

    def _accounts(self) -> Accounts:
        if self.accounts is None:
            self.accounts = Accounts(self.ledger)
        return self.accounts

    async def handle(self, requests: Sequence[PosRequest]) -> list[PosResult]:
        """One answer per request, in order. A failure while reading for one request (a
        database timeout, say) answers that request `unavailable`, never its neighbours,
        but for those whose read was the same statement (the coupon and points-redemption
        reads of one turn of the event loop, `cardcore.coalesce`).

        Two parts run at once: the feature requests (coupons, points earned with another
        tender or redeemed, service and manager cards), each answered by its service in
        round trips of its own, at most `POS_FEATURE_PLANS_CONCURRENT_MAX` together; and
        the money (`_money`: the other requests planned one by one, their terminals and
        cards mostly in memory, then decided and submitted together). A call waits for the
        slower part, not for the sum of every coupon's round trips and the money's. Two
        feature requests of one call, or a feature request and a purchase, are no closer
        than two requests of different calls, which always ran at once (one request in
        flight per terminal). A feature that fails in any way answers its own request
        `unavailable` (the gateway answers 96 and reverses it), so the money goes on
        without it; a failure of the money part ends the call, and the features still
        running end with it before `handle` raises."""
        await self._warm_cards(requests)
        settled, unclaimed = await self._key_conflicts(requests)
        # The feature keys not claimed yet are claimed while the money goes on: the feature
        # requests wait for the claims (all of them, so that they still start in one turn
        # of the event loop and their reads meet: `cardcore.coalesce`), the money never
        # does (it was checked just now).
        claiming = asyncio.ensure_future(self._claim(requests, unclaimed)) if unclaimed else None
        room = asyncio.Semaphore(limits.POS_FEATURE_PLANS_CONCURRENT_MAX)

        async def feature(i: int, r: PosRequest) -> _Plan:
            try:
                if claiming is not None:
                    refused = await asyncio.shield(claiming)
                    if i in refused:
                        return refused[i]
                async with room:
                    return await self._plan_or_unavailable(r)
            except Exception:  # a defect in one feature never fails its neighbours
                log.exception("a feature request failed", extra={"kind": str(r.kind)})
                return _Plan(r, answer=PosResult(Outcome.UNAVAILABLE))

        features = {
            i: asyncio.ensure_future(feature(i, r))
            for i, r in enumerate(requests)
            if (r.kind in FEATURE_KINDS or r.kind in POINTS_KINDS) and i not in settled
        }
        try:
            money = {
                i: await self._plan_or_unavailable(r)
                for i, r in enumerate(requests)
                if i not in features and i not in settled
            }
            await self._money(list(money.values()))
            answered = {i: await task for i, task in features.items()}
        finally:
            ended = [*features.values(), *([claiming] if claiming is not None else [])]
            for task in ended:
                task.cancel()  # nothing when they are done
            await asyncio.gather(*ended, return_exceptions=True)
        plans = [
            settled[i] if i in settled else answered[i] if i in features else money[i]
            for i in range(len(requests))
        ]
        await self._rewards(plans)
        out = []
        for plan in plans:
            assert plan.answer is not None
            try:
                out.append(await self._complete(plan, plan.answer))
            except DATABASE_ERRORS:
                log.exception("POS answer could not be completed")
                out.append(PosResult(Outcome.UNAVAILABLE))
        return out

    async def _money(self, plans: list[_Plan]) -> None:
        """Under the card locks of the call's money: decided, submitted in one call to the
        writer (again for resends found), the points round; then the features undo what
        the call's approved reversals reversed, and voids take back their rewards."""
        async with contextlib.AsyncExitStack() as held:
            for lock in self._locks(plans):
                await held.enter_async_context(lock)
            await self._still_usable(plans)
            await self._decide(plans)
            await self._resends(plans)
            await self._submit(plans)
            if await self._resends(plans):
                await self._submit(plans)
            await self._granted(plans)
            await self._points(plans)
        await self._undo(plans)

    async def _warm_cards(self, requests: Sequence[PosRequest]) -> None:
        """The cards the requests name, read together before the requests are planned
        (at most `CARD_WARM_MAX`; a card number that fails Luhn is left to its plan). When
        the read fails each plan reads its own card, as without it."""
        tokens = [
            card_token(self.token_key, r.card) for r in requests if r.card and luhn_ok(r.card)
        ][: limits.CARD_WARM_MAX]
        try:
            await self.directory.warm_cards(tokens)
        except DATABASE_ERRORS:
            log.warning("the cards of a call could not be read together")

    async def _key_conflicts(
        self, requests: Sequence[PosRequest]
    ) -> tuple[dict[int, _Plan], dict[int, tuple[str, str]]]:
        """The requests answered before planning, by index: those sent under a key already
        used for another function (94, and nothing done); and the feature requests whose
        key is not claimed yet (index -> (key, function)), for `_claim`. A key (terminal,
        batch cycle, batch, STAN) is one transaction: the ledger keeps a money request's
        key, and a feature request claims its key for its function (`CLAIMED`) in
        `pos_claims`. So a money request under a claimed key, and a feature request under a
        key claimed for another function or, unclaimed, held by the ledger, are answered 94
        (a points redemption's own money goes under its key after its claim: its resend
        finds the claim first). One request in flight per terminal: nothing of the same
        terminal runs between the check and the request. One read for the call's keys;
        when it fails, the checked requests are answered `unavailable`."""
        feature_keys: dict[str, str] = {}
        of: dict[str, int] = {}
        free: dict[int, tuple[str, str]] = {}
        for i, r in enumerate(requests):
            function = CLAIMED.get(r.kind)
            if function is None and r.kind not in _KEPT_BY_LEDGER:
                continue
            try:
                t = await self.directory.terminal(r.terminal)
            except DATABASE_ERRORS:
                continue  # its plan answers it (unavailable)
            if t is None or t.state != "active" or r.batch != t.batch:
                continue  # its plan answers it
            key = transaction_key(t, r.batch, r.stan)
            if function is not None:
                feature_keys[key] = function
            if may_have_claims(t):
                of[key] = i
            elif function is not None:
                free[i] = (key, function)  # no key of its open batch is claimed
        if not of:
            return {}, free
        try:
            claimed = await self.directory.claimed(sorted(of))
        except DATABASE_ERRORS:
            log.exception("the keys of a call could not be read")
            down = PosResult(Outcome.UNAVAILABLE)
            return {i: _Plan(requests[i], answer=down) for i in of.values()}, {}
        unclaimed = {of[k]: (k, f) for k, f in feature_keys.items() if k in of and k not in claimed}
        return self._mismatched(requests, of, claimed, feature_keys), unclaimed | free

    async def _claim(
        self, requests: Sequence[PosRequest], unclaimed: dict[int, tuple[str, str]]
    ) -> dict[int, _Plan]:
        """Claim the keys of feature requests not claimed yet (`Directory.claim_keys`, one
        statement on PostgreSQL): those the ledger holds (a purchase's, or a decline it
        keeps) are answered 94 and never claimed; the others are claimed, and one claimed
        meanwhile for another function is answered 94. When the claims cannot be written,
        these requests are answered `unavailable` (the call's money is not held up)."""
        wanted = dict(unclaimed.values())
        of = {key: i for i, (key, _) in unclaimed.items()}
        try:
            claimed = await self.directory.claim_keys(wanted, self.clock_ms())
        except DATABASE_ERRORS:
            log.exception("the keys of a call's feature requests could not be claimed")
            down = PosResult(Outcome.UNAVAILABLE)
            return {i: _Plan(requests[i], answer=down) for i in unclaimed}
        return self._mismatched(requests, of, claimed, wanted)

    @staticmethod
    def _mismatched(
        requests: Sequence[PosRequest], of: dict[str, int], claimed: dict[str, str],
        feature_keys: dict[str, str],
    ) -> dict[int, _Plan]:  # fmt: skip
        """94 for each request whose key stands claimed (or held by the ledger: "money")
        for a function other than its own (a money request has none)."""
        return {
            of[key]: _Plan(requests[of[key]], answer=PosResult(Outcome.DUPLICATE_MISMATCH))
            for key, function in claimed.items()
            if key in of and function != feature_keys.get(key)
        }

    async def _plan_or_unavailable(self, r: PosRequest) -> _Plan:
        try:
            return await self._plan(r)
        except (*DATABASE_ERRORS, AccountsUnavailable, Busy, LedgerUnavailable):
            log.exception("POS request could not be planned", extra={"kind": str(r.kind)})
            return _Plan(r, answer=PosResult(Outcome.UNAVAILABLE))

    def _locks(self, plans: list[_Plan]) -> list[asyncio.Lock]:
        """The card-account locks of this call's purchases, top-ups, voids and refunds (a
        void or refund's points clawback reads the lots it takes from), in ascending id
        order (every call takes them in one order: two calls never wait for each other)."""
        ids = {
            p.card.account_id
            for p in plans
            if p.card is not None
            and (p.money is not None or (p.op is not None and p.request.kind in _CLAWING))
        }
        accounts = self._accounts() if ids else None
        return [] if accounts is None else [accounts.lock(i) for i in sorted(ids)]

    async def _granted(self, plans: list[_Plan]) -> None:
        """A top-up is a sale of stored value: its hold, once the ledger took it (fresh, not
        a replay), spends its amount from the store's stored-value grant for the card's class
        (`topup_grant`). When the grant refuses it (none, expired, or its budget used up), the
        hold is voided at once under `K/G` and the top-up declined `not_permitted` with the
        refusal; when the grant cannot be read now, it is voided and answered `unavailable`.
        The void's reason keeps the refusal: a resend of the top-up is answered the same
        (`_grant_refusal`)."""
        if self.topup_grant is None:
            return
        for plan in plans:
            res, card, t = plan.result, plan.card, plan.terminal
            if plan.request.kind is not Kind.TOPUP or card is None or t is None:
                continue
            if res is None or not res.ok or res.replayed or res.transfer_id is None:
                continue
            r = plan.request
            try:
                refusal = await self.topup_grant(
                    t.store, card.class_code, r.amount,
                    key=transaction_key(t, r.batch, r.stan), hold_id=res.transfer_id,
                )  # fmt: skip
                answer = PosResult(Outcome.NOT_PERMITTED, refusal=refusal) if refusal else None
            except DATABASE_ERRORS:
                log.exception("a top-up's grant could not be spent")
                refusal, answer = UNAVAILABLE_REFUSAL, PosResult(Outcome.UNAVAILABLE)
            if answer is None:
                continue
            key = transaction_key(t, r.batch, r.stan) + GRANT_VOID_SUFFIX
            reason = (GRANT_VOID_REASON + refusal)[: limits.REASON_CHARS_MAX]
            void = VoidPending(
                POS_CLIENT, key, res.transfer_id, reason=reason, metadata=_metadata(t, r)
            )
            try:
                await self.ledger.submit([void])
            except (Busy, LedgerUnavailable):
                log.exception("a top-up refused by its grant could not be voided (it lapses)")
            plan.answer = answer

    async def _grant_refusal(self, plan: _Plan) -> PosResult | None:
        """The resend of a top-up whose grant refused it (`_granted`: its hold voided under
        `K/G`, the refusal in the void's reason): the first answer again, or None."""
        t, r = plan.terminal, plan.request
        if r.kind is not Kind.TOPUP or t is None:
            return None
        key = transaction_key(t, r.batch, r.stan) + GRANT_VOID_SUFFIX
        void = await self.directory.keyed_transfer(POS_CLIENT, key)
        if void is None or not str(void["reason"]).startswith(GRANT_VOID_REASON):
            return None
        refusal = str(void["reason"]).removeprefix(GRANT_VOID_REASON)
        if refusal == UNAVAILABLE_REFUSAL:
            return PosResult(Outcome.UNAVAILABLE, replayed=True)
        return PosResult(Outcome.NOT_PERMITTED, refusal=refusal, replayed=True)

    async def _still_usable(self, plans: list[_Plan]) -> None:
        """Under the card locks: each locked card's state again, as the directory holds it
        now (in memory; a card changed since is read anew: every change forgets it while it
        holds the same lock, as a member's delete closing its cards does). A card closed,
        frozen or replaced between the plan and the lock is declined as at the plan."""
        for plan in plans:
            card, kind = plan.card, plan.request.kind
            if card is None or plan.answer is not None:
                continue
            if plan.money is None and not (plan.op is not None and kind in _CLAWING):
                continue
            try:
                fresh = await self.directory.card(card.token)
            except DATABASE_ERRORS:
                log.exception("a card could not be read again under its lock")
                plan.op, plan.answer = None, PosResult(Outcome.UNAVAILABLE)
                continue
            refused = unusable_outcome(fresh, giving_back=kind in _CLAWING)
            if refused is not None:
                plan.op = None
                self._decline(plan, refused)

    async def _points(self, plans: list[_Plan]) -> None:
        """The points round: approved purchases earn, voids and refunds take back, in one
        submit after the money's; when it cannot be decided the answer is `unavailable`
        (the terminal reverses or resends: both are idempotent)."""
        if self.points_round is None:
            return
        owners, done = [], []
        for plan in plans:
            a, card, t, r = plan.answer, plan.card, plan.terminal, plan.request
            if a is None or a.outcome not in APPROVALS or card is None or t is None:
                continue
            if r.kind not in (Kind.PURCHASE, *_CLAWING):
                continue
            key = transaction_key(t, r.batch, r.stan)
            moved = r.amount if a.amount is None else a.amount
            res = plan.result
            fresh = res is not None and res.ok and not res.replayed
            done.append(MoneyDone(r, t, card, key, moved, plan.original_key, fresh))
            owners.append(plan)
        if not done:
            return
        try:
            answers = await self.points_round(done)
        except (*DATABASE_ERRORS, AccountsUnavailable, Busy, LedgerUnavailable):
            log.exception("the points round could not be decided")
            answers = [PointsAnswer(None, None, ok=False)] * len(done)
        for plan, got in zip(owners, answers, strict=True):
            if got is None:
                continue
            if not got.ok:
                plan.answer = PosResult(Outcome.UNAVAILABLE)
                continue
            assert plan.answer is not None
            plan.answer = replace(plan.answer, points=got.points, points_balance=got.points_balance)

    async def _undo(self, plans: list[_Plan]) -> None:
        """After the ledger took a reversal (or found nothing to undo and left its
        tombstone): each feature undoes what it did under the reversed key (a coupon's use,
        service uses, a manager's authorization, points), idempotently. Never before: a
        reversal the ledger refuses (the money given back is spent) undoes nothing. When a
        feature cannot answer now the reversal is answered `unavailable`: the gateway's
        store and forward sends it again, and every step is idempotent. An approved void
        takes back its purchase's unused instant rewards (`unreward`; its points went back
        in the points round); when that cannot be done now it is answered `unavailable`
        and the terminal's resend (replayed by the ledger) does it."""
        for plan in plans:
            a, t, kind = plan.answer, plan.terminal, plan.request.kind
            if kind not in (Kind.REVERSE, Kind.VOID) or a is None or t is None:
                continue
            if a.outcome is not Outcome.APPROVED or not plan.original_key:
                continue
            try:
                if kind is Kind.VOID:  # its points went back in the points round
                    if self.unreward is not None:
                        r = plan.request
                        await self.unreward(plan.original_key, transaction_key(t, r.batch, r.stan))
                    continue
                for undo in self.reversers:
                    await undo(t, plan.original_key)
                if plan.voided_key and self.reward_back is not None:
                    await self.reward_back(plan.voided_key, plan.original_key)
            except (*DATABASE_ERRORS, AccountsUnavailable, Busy, LedgerUnavailable):
                log.exception("a feature could not undo a reversed or voided request")
                plan.answer = PosResult(Outcome.UNAVAILABLE)

    async def _rewards(self, plans: list[_Plan]) -> None:
        """Approved purchases (paid by the card, or by another tender: POINTS_EARN) get the
        coupons of the campaigns they qualify for. The reward never decides the sale: when
        it cannot be issued now the sale stands without it (a resend issues it). A purchase
        reversed or voided since gets none: a resend of one (`_complete` declines it) is
        not rewarded, and a reward issued while its reversal was being taken (whose hook
        found nothing to void yet) is voided here."""
        if self.rewards is None:
            return
        for plan in plans:
            a, card, t, r = plan.answer, plan.card, plan.terminal, plan.request
            if a is None or a.outcome not in APPROVALS or card is None or t is None:
                continue
            if r.kind not in REWARDED:
                continue
            moved = r.amount if a.amount is None else a.amount
            key = transaction_key(t, r.batch, r.stan)
            try:
                if a.replayed and await self._undone(plan, a):
                    continue
                codes = await self.rewards(t, key, card, moved)
                if codes and await self._undone(plan, a):
                    if self.unreward is not None:
                        await self.unreward(key, "")
                    continue
            except DATABASE_ERRORS:
                log.exception("an instant reward could not be issued")
                continue
            if codes:
                plan.answer = replace(a, rewards=codes)

    async def _undone(self, plan: _Plan, answer: PosResult) -> bool:
        """Whether the money of an approved request was reversed since (a void, a 0400)."""
        if plan.request.kind not in UNDOABLE or not answer.rrn:
            return False
        return await self.directory.undone(int(answer.rrn))

    async def _submit(self, plans: list[_Plan]) -> None:
        pending = [p for p in plans if p.op is not None and p.answer is None]
        if not pending:
            return
        try:
            results = await self.ledger.submit([p.op for p in pending if p.op is not None])
        except (Busy, LedgerUnavailable):
            results = None
        for i, plan in enumerate(pending):
            if results is None:
                plan.answer = PosResult(Outcome.UNAVAILABLE)
                continue
            assert plan.finish is not None
            plan.result = results[i]
            plan.answer = plan.finish(results[i])

    async def _complete(self, plan: _Plan, answer: PosResult) -> PosResult:
        """A replayed approval answers what the first attempt answered, with the balance
        stored after it, unless a reversal undid it since: then the resend is declined, or
        the terminal would print an approval for money that went back."""
        resent = answer.replayed and answer.outcome in APPROVALS and answer.rrn
        undoable = plan.request.kind in UNDOABLE
        if resent and undoable and await self.directory.undone(int(answer.rrn)):
            refused = await self._grant_refusal(plan)
            if refused is not None:
                return refused
            return PosResult(Outcome.REVERSED_BEFORE_ARRIVAL, replayed=True)
        if answer.replayed and answer.balance is None and plan.card is not None and answer.rrn:
            after = await self.directory.balance_after(int(answer.rrn), plan.card.account_id)
            if after is not None:
                return replace(answer, balance=available(after))
        return answer

    # --- planning ------------------------------------------------------------------------------

    async def _plan(self, r: PosRequest) -> _Plan:
        plan = _Plan(r)
        terminal = await self.directory.terminal(r.terminal)
        if terminal is None:
            plan.answer = PosResult(Outcome.TERMINAL_UNKNOWN)
            return plan
        plan.terminal = terminal
        if terminal.state != "active" and r.kind is not Kind.REVERSE:
            plan.answer = PosResult(Outcome.TERMINAL_DISABLED)  # a reversal is always taken
            return plan
        if r.kind is Kind.SIGN_ON:
            plan.answer = PosResult(
                Outcome.APPROVED,
                batch=terminal.batch,
                mid=terminal.mid,
                key_mode=terminal.key_mode,
                tmk_sealed=terminal.tmk_sealed,
            )
            return plan
        if r.kind is Kind.SETTLE:
            plan.answer = await self._settle(terminal, r)
            return plan
        if r.kind is Kind.UPLOAD:
            plan.answer = await self._upload(terminal, r)
            return plan
        # A reversal may come after its batch closed from the gateway's store and forward:
        # it never waits. The terminal's own for a batch it settled since is refused: it
        # sends what it owes before it settles, and a refund gives money back after that.
        if r.batch != terminal.batch and r.kind is not Kind.REVERSE:
            plan.answer = PosResult(Outcome.BATCH_MISMATCH, batch=terminal.batch)
            return plan
        if r.batch != terminal.batch and not r.forwarded:
            plan.answer = PosResult(Outcome.BATCH_SETTLED)
            return plan
        if r.kind in FEATURE_KINDS or r.kind in POINTS_KINDS:
            await self._feature(plan, terminal)
            return plan
        planner = {
            Kind.INQUIRY: self._inquiry,
            Kind.PURCHASE: self._purchase,
            Kind.TOPUP: self._topup,
            Kind.TOPUP_CONFIRM: self._topup_confirm,
            Kind.VOID: self._void,
            Kind.REFUND: self._refund,
            Kind.REVERSE: self._reverse,
        }[r.kind]
        await planner(plan, terminal)
        return plan

    async def _feature(self, plan: _Plan, t: Terminal) -> None:
        """A request a feature service answers: its card (when it names one) checked here
        as for any request, then the service decides."""
        r = plan.request
        handler = self.features.get(r.kind)
        if handler is None:
            plan.answer = PosResult(Outcome.FUNCTION_NOT_SUPPORTED)
            return
        card = None
        if r.card and r.kind is not Kind.MANAGER_AUTH:
            card = await self._card(plan, giving_back=r.kind in TAKING_BACK)
            # Points spent as money need the card's PIN, as a purchase does (a locked PIN
            # refuses them); for the other functions a PIN sent is checked.
            paying = r.kind is Kind.POINTS_REDEEM
            if card is None or not await self._pin_ok(plan, card, required=paying):
                return
        plan.answer = await handler(r, t, transaction_key(t, r.batch, r.stan), card)

    def _decline(self, plan: _Plan, outcome: Outcome) -> None:
        """A host decline; for a purchase or top-up of a known card, one to check against
        the ledger's key (a resend of one it already took gets that answer instead)."""
        plan.answer = PosResult(outcome)
        plan.resend = plan.request.kind in GUARDED and plan.card is not None

    async def _card(self, plan: _Plan, *, giving_back: bool = False) -> Card | None:
        """The request's card, or None with the answer set. Giving money back (a void, a
        refund) is never refused for expiry, nor for a frozen or lost card: a sale made
        before must stay undoable, and the money stays on the card's account."""
        r = plan.request
        if not r.card or not luhn_ok(r.card):
            plan.answer = PosResult(Outcome.CARD_NOT_FOUND)
            return None
        card = await self.directory.card(card_token(self.token_key, r.card))
        if card is None:
            plan.answer = PosResult(Outcome.CARD_NOT_FOUND)
            return None
        plan.card = card
        usable = card.state in GIVE_BACK_STATES if giving_back else card.state == CardState.ACTIVE
        if not usable:
            self._decline(plan, outcome_of_state(card.state))
            return None
        if not giving_back and card.expires and _yymm(self.clock_ms()) > card.expires:
            self._decline(plan, Outcome.CARD_EXPIRED)
            return None
        return card

    async def _paying_card(self, plan: _Plan) -> Card | None:
        """The card of a request that moves an amount; None with the answer set."""
        if plan.request.amount <= 0:
            plan.answer = PosResult(Outcome.BAD_REQUEST)
            return None
        return await self._card(plan)

    async def _pin_ok(self, plan: _Plan, card: Card, *, required: bool) -> bool:
        """Whether the request may go on as far as the PIN goes; the answer set when not.
        A card without a PIN needs none (a block sent is only checked for format, by the
        gateway). The PIN and its block are never logged."""
        r = plan.request
        if not card.has_pin or not (r.pin_block or required):
            return True
        if not r.pin_block:
            self._decline(plan, Outcome.PIN_REQUIRED)
            return False
        if self.pin_of is None or self.pins is None:
            log.error("a card has a PIN and this host cannot verify PINs")
            plan.answer = PosResult(Outcome.UNAVAILABLE)
            return False
        try:
            pin = self.pin_of(r.card, r.pin_block)
        except ValueError:
            plan.answer = PosResult(Outcome.BAD_REQUEST)  # not a zone block of this host
            return False
        verdict, _failures = await self.pins.check(card.id, pin)
        if verdict in (PinCheck.OK, PinCheck.NOT_SET):
            return True
        locked = verdict is PinCheck.LOCKED
        self._decline(plan, Outcome.PIN_LOCKED if locked else Outcome.PIN_WRONG)
        return False

    async def _class_of(self, card: Card) -> CardClass | None:
        return await self.directory.card_class(card.class_code) if card.class_code else None

    async def _card_metadata(self, plan: _Plan) -> dict[str, str]:
        """The card's part of a purchase's or top-up's metadata: its class and, on a
        purchase, the class discount (what the POS was told at the inquiry)."""
        card = plan.card
        if card is None or not card.class_code:
            return {}
        out = {"card_class": card.class_code}
        if plan.request.kind is Kind.PURCHASE:
            found = await self._class_of(card)
            if found is not None:
                out["discount_bp"] = str(found.discount_bp)
        return out

    async def _inquiry(self, plan: _Plan, _terminal: Terminal) -> None:
        card = await self._card(plan)
        if card is None or not await self._pin_ok(plan, card, required=False):
            return
        account = await self.ledger.account(card.account_id)
        if account is None:
            plan.answer = PosResult(Outcome.CARD_NOT_FOUND)
            return
        if account.info.flags.debit_frozen:
            plan.answer = PosResult(Outcome.CARD_FROZEN)
            return
        found = await self._class_of(card)
        plan.answer = PosResult(
            Outcome.APPROVED,
            balance=available(account.balance),
            discount_bp=None if found is None else found.discount_bp,
        )

    async def _purchase(self, plan: _Plan, t: Terminal) -> None:
        card = await self._paying_card(plan)
        if card is None or not await self._pin_ok(plan, card, required=True):
            return
        # The card's entity owes the store's entity what the card paid.
        clearing = await self._accounts().clearing(card.legal_entity, t.legal_entity)
        extra = await self._card_metadata(plan)
        plan.money = _Money(clearing, extra, needs_balance=plan.request.partial)

    async def _balance_max(self, card: Card) -> int:
        """The most the card may hold, in fen: its own maximum and its class's, the lower
        (0: no maximum)."""
        found = await self._class_of(card)
        bounds = [x for x in (card.balance_max, 0 if found is None else found.balance_max) if x]
        return min(bounds, default=0)

    async def _limit_credit(self, plan: _Plan, card: Card, key: str) -> None:
        """A void or refund gives money back to the card: held to the card's maximum like a
        top-up (`_decide`), unless the ledger took it already (a resend, answered as first)."""
        limit = await self._balance_max(card)
        if limit and await self.directory.transfer_by_key(key) is None:
            plan.credit_limit = limit

    async def _topup(self, plan: _Plan, t: Terminal) -> None:
        card = await self._paying_card(plan)
        if card is None:
            return
        found = await self._class_of(card)
        if found is not None and found.gift:  # its value is sold once, at a denomination
            plan.answer = PosResult(Outcome.NOT_PERMITTED, refusal="gift_not_reloadable")
            return
        limit = await self._balance_max(card)
        # The store's entity took the cash: it owes the card's entity the value.
        clearing = await self._accounts().clearing(t.legal_entity, card.legal_entity)
        extra = await self._card_metadata(plan)
        plan.money = _Money(clearing, extra, limit=limit, needs_balance=limit > 0)

    async def _decide(self, plans: list[_Plan]) -> None:
        """Under the card locks: the ops of this call's purchases and top-ups, in request
        order, each seeing the balance less (or plus) what the ones before it planned."""
        balances = await self._balances(plans)
        debits: dict[int, int] = {}
        credits: dict[int, int] = {}
        for plan in plans:
            if plan.credit_limit and plan.op is not None and plan.answer is None:
                self._hold_to_limit(plan, balances, credits)
                continue
            if plan.money is None or plan.answer is not None or plan.card is None:
                continue
            r, card, money = plan.request, plan.card, plan.money
            account_id = card.account_id
            account = balances.get(account_id)
            if money.needs_balance and account is None:
                found = account_id in balances
                plan.answer = PosResult(Outcome.CARD_NOT_FOUND if found else Outcome.UNAVAILABLE)
                continue
            if r.kind is Kind.PURCHASE:
                taken = r.amount
                if money.needs_balance and account is not None:
                    spendable = available(account.balance) - debits.get(account_id, 0)
                    if 0 < spendable < r.amount:
                        taken = spendable  # split tender: the rest is the terminal's to collect
                debits[account_id] = debits.get(account_id, 0) + taken
                self._purchase_op(plan, money, taken)
                continue
            if (
                money.limit
                and account is not None
                and _past_limit(account, credits, r.amount, money.limit)
            ):
                self._decline(plan, Outcome.OVER_LIMIT)
                continue
            credits[account_id] = credits.get(account_id, 0) + r.amount
            self._topup_op(plan, money)

    def _hold_to_limit(
        self, plan: _Plan, balances: dict[int, Account | None], credits: dict[int, int]
    ) -> None:
        """A void or refund that would take its card past its maximum is declined (61, the
        money stays where it is: the till pays it back otherwise)."""
        assert plan.card is not None
        account_id = plan.card.account_id
        account = balances.get(account_id)
        if account is None:
            found = account_id in balances
            plan.op = None
            plan.answer = PosResult(Outcome.CARD_NOT_FOUND if found else Outcome.UNAVAILABLE)
            return
        if _past_limit(account, credits, plan.request.amount, plan.credit_limit):
            plan.op = None
            plan.answer = PosResult(Outcome.OVER_LIMIT)
            return
        credits[account_id] = credits.get(account_id, 0) + plan.request.amount

    async def _balances(self, plans: list[_Plan]) -> dict[int, Account | None]:
        """The accounts whose balance a check needs, read once each (a few at a time). An
        account that could not be read is missing; one that does not exist maps to None."""
        wanted = sorted(
            {
                p.card.account_id
                for p in plans
                if p.card is not None
                and ((p.money is not None and p.money.needs_balance) or p.credit_limit)
            }
        )
        out: dict[int, Account | None] = {}
        step = limits.DB_POOL_SIZE_MAX
        for i in range(0, len(wanted), step):
            chunk = wanted[i : i + step]
            read = await asyncio.gather(
                *(self.ledger.account(a) for a in chunk), return_exceptions=True
            )
            for account_id, got in zip(chunk, read, strict=True):
                if isinstance(got, BaseException):
                    if not isinstance(got, DATABASE_ERRORS):
                        raise got
                    log.warning("a card balance could not be read", extra={"error": repr(got)})
                    continue
                out[account_id] = got
        return out

    def _purchase_op(self, plan: _Plan, money: _Money, taken: int) -> None:
        card, t = plan.card, plan.terminal
        assert card is not None
        assert t is not None
        legs = value_postings(
            source=card.account_id, target=t.sales_account, amount=taken, clearing=money.clearing
        )
        postings = tuple(Posting(a, Side(side), amount) for a, side, amount in legs)
        self._purchase_from(plan, postings, money.extra)

    def _purchase_from(
        self, plan: _Plan, postings: tuple[Posting, ...], extra: dict[str, str]
    ) -> None:
        r, card, t = plan.request, plan.card, plan.terminal
        assert card is not None
        assert t is not None
        taken = postings[0].amount
        if taken != r.amount:
            extra = {**extra, "requested": str(r.amount)}
        plan.op = CreateTransfer(
            client=POS_CLIENT,
            key=transaction_key(t, r.batch, r.stan),
            asset=CURRENCY,
            postings=postings,
            reason="purchase",
            metadata=_metadata(t, r, extra),
        )
        plan.finish = lambda res: _answer(res, card, taken, r.amount)

    def _topup_op(self, plan: _Plan, money: _Money) -> None:
        r, card, t = plan.request, plan.card, plan.terminal
        assert card is not None
        assert t is not None
        legs = value_postings(
            source=t.cash_account, target=card.account_id, amount=r.amount, clearing=money.clearing
        )
        postings = tuple(Posting(a, Side(side), x) for a, side, x in legs)
        self._topup_from(plan, postings, money.extra)

    def _topup_from(
        self, plan: _Plan, postings: tuple[Posting, ...], extra: dict[str, str]
    ) -> None:
        r, card, t = plan.request, plan.card, plan.terminal
        assert card is not None
        assert t is not None
        # A hold until the terminal confirms (0220); it lapses by itself if it never does.
        plan.op = CreateTransfer(
            client=POS_CLIENT,
            key=transaction_key(t, r.batch, r.stan),
            asset=CURRENCY,
            postings=postings,
            pending=True,
            timeout_s=limits.TOPUP_CONFIRM_S,
            reason="topup",
            metadata=_metadata(t, r, extra),
        )
        plan.finish = lambda res: _answer(res, card, r.amount)

    async def _resends(self, plans: list[_Plan]) -> bool:
        """Purchases and top-ups the host declined, and purchases the ledger found under
        their key with other postings or card metadata: when the ledger holds a transfer of
        this card under the key, the request is a resend, and its op becomes that transfer
        again (the ledger then answers what it answered first, or 94 if the content
        differs). Whether any op was made."""
        again = False
        for plan in plans:
            r, card, t = plan.request, plan.card, plan.terminal
            if card is None or t is None or plan.from_stored or r.kind not in GUARDED:
                continue
            declined = plan.resend and plan.op is None
            plan.resend = False  # looked up once
            other = plan.result is not None and plan.result.code in _OTHER_CONTENT
            if not (declined or (other and r.kind is Kind.PURCHASE)):
                continue
            try:
                stored = await self.directory.transfer_by_key(transaction_key(t, r.batch, r.stan))
                if stored is None or not _of_card(stored, card, r.kind):
                    continue
            except DATABASE_ERRORS:
                log.exception("a resend could not be checked", extra={"kind": str(r.kind)})
                plan.answer, plan.op = PosResult(Outcome.UNAVAILABLE), None
                continue
            postings = tuple(Posting(a, Side(side), x) for a, side, x in stored["postings"])
            # The card's part as it was recorded: its class or the class discount may have
            # changed since, and the resend is the same request all the same.
            extra = {k: v for k, v in stored["metadata"].items() if k in _CARD_METADATA}
            if r.kind is Kind.PURCHASE:
                self._purchase_from(plan, postings, extra)
            else:
                self._topup_from(plan, postings, extra)
            plan.answer, plan.result, plan.from_stored = None, None, True
            again = True
        return again

    async def _topup_confirm(self, plan: _Plan, t: Terminal) -> None:
        r = plan.request
        hold = await self.directory.transfer_by_key(
            transaction_key(t, r.original_batch, r.original_stan)
        )
        if hold is None or hold["reason"] != "topup":
            plan.answer = PosResult(Outcome.ORIGINAL_NOT_FOUND)
            return
        if hold["postings"][0][2] != r.amount:
            plan.answer = PosResult(Outcome.ORIGINAL_MISMATCH)  # it would unbalance the batch
            return
        # The cash is in the drawer: the value lands whatever the card's state since.
        plan.op = PostPending(
            client=POS_CLIENT,
            key=transaction_key(t, r.batch, r.stan),
            pending_id=hold["id"],
            reason="topup_confirm",
            metadata=_metadata(t, r),
        )
        plan.finish = lambda res: _answer(res, None, hold["postings"][0][2])

    async def _void(self, plan: _Plan, t: Terminal) -> None:
        r = plan.request
        card = await self._card(plan, giving_back=True)
        if card is None:
            return
        target_key = transaction_key(t, r.original_batch, r.original_stan)
        if r.original_batch != r.batch:
            plan.answer = PosResult(Outcome.ORIGINAL_NOT_FOUND)  # a void is same batch only
            return
        original = await self.directory.transfer_by_key(target_key)
        if original is None or original["reason"] != "purchase":
            plan.answer = PosResult(Outcome.ORIGINAL_NOT_FOUND)
            return
        if not _matches(original, card, r.amount):  # a split tender: the amount taken
            plan.answer = PosResult(Outcome.ORIGINAL_MISMATCH)
            return
        plan.original_key = target_key
        key = transaction_key(t, r.batch, r.stan)
        reversed_key = await self._chain_target(original, key, most=limits.REVERSAL_CHAIN_MAX - 1)
        if reversed_key is None:  # voided and reinstated as often as it may be
            plan.answer = PosResult(Outcome.ALREADY_REVERSED)
            return
        plan.op = Reverse(
            client=POS_CLIENT,
            key=key,
            target_key=reversed_key,
            reason="void",
            metadata=_metadata(t, r),
            whole=True,  # refunded in part: a void would give back the rest, not the amount
        )
        plan.finish = lambda res: _answer(res, card, r.amount)
        await self._limit_credit(plan, card, key)

    async def _refund(self, plan: _Plan, t: Terminal) -> None:
        r = plan.request
        card = await self._card(plan, giving_back=True)
        if card is None:
            return
        if r.amount <= 0 or not r.rrn:
            plan.answer = PosResult(Outcome.BAD_REQUEST)
            return
        original = await self.directory.transfer_by_id(int(r.rrn))
        if original is None or original["reason"] != "purchase":
            plan.answer = PosResult(Outcome.ORIGINAL_NOT_FOUND)
            return
        if original["metadata"].get("store") != t.store:
            # Refunded where it was bought: a refund gives back from the selling store's
            # sales, and its batch line must be that store's for the day's books to tie.
            plan.answer = PosResult(Outcome.ORIGINAL_NOT_FOUND)
            return
        if not _matches(original, card, None):
            plan.answer = PosResult(Outcome.ORIGINAL_MISMATCH)
            return
        plan.original_key = original["key"]
        plan.op = Refund(
            client=POS_CLIENT,
            key=transaction_key(t, r.batch, r.stan),
            target_key=original["key"],
            amount=r.amount,
            reason="refund",
            metadata=_metadata(t, r),
        )
        plan.finish = lambda res: _answer(res, card, r.amount)
        await self._limit_credit(plan, card, plan.op.key)

    async def _reverse(self, plan: _Plan, t: Terminal) -> None:
        """Always taken, whatever the card's state: it only undoes what the terminal sent."""
        r = plan.request
        target_key = transaction_key(t, r.batch, r.stan)
        key = reversal_key(t, r.batch, r.stan)
        plan.original_key = target_key  # the features undo it once the ledger did (`_undo`)
        original = await self.directory.transfer_by_key(target_key)
        if original is not None and original["reason"] == "void" and original["target_id"]:
            plan.voided_key = await self._voided_purchase(original["target_id"])
        if original is not None and original["kind"] == "pending":
            plan.op = VoidPending(
                client=POS_CLIENT,
                key=key,
                pending_id=original["id"],
                reason="reversal",
                metadata=_metadata(t, r),
            )
        else:
            if original is not None:  # past the cap: the original's key (nothing undone)
                found = await self._chain_target(original, key, most=limits.REVERSAL_CHAIN_MAX)
                target_key = found or target_key
            plan.op = Reverse(
                client=POS_CLIENT,
                key=key,
                target_key=target_key,
                tombstone=True,
                reason="reversal",
                metadata=_metadata(t, r),
            )
        plan.finish = _reversal_answer

    async def _chain_target(self, original: dict[str, Any], key: str, *, most: int) -> str | None:
        """The key a reversal or void under `key` of `original` reverses. The ledger reverses
        a transfer once, and a reversal may be reversed (a void the terminal reversed: the
        purchase stands again), so a purchase's reversals form a chain: while it is even the
        purchase stands and the chain's last link (the purchase itself when there is none)
        is what undoes it now; while it is odd the purchase is undone and its own key is
        answered (the ledger refuses, or a reversal does nothing). A resend finds itself in
        the chain and repeats its target. None: the chain has `most` links already."""
        chain = [original, *await self.directory.reversals_of(original["id"])]
        mine = next((j for j, x in enumerate(chain) if x["key"] == key), None)
        if mine is not None:
            return str(chain[mine - 1]["key"]) if mine else str(original["key"])
        links = len(chain) - 1
        if links % 2 == 1:
            return str(original["key"])
        return None if links > most else str(chain[-1]["key"])

    async def _voided_purchase(self, target_id: int) -> str:
        """The key of the purchase a void undid: its target, or, a void of a purchase whose
        earlier void was reversed (`_void`), the root of the chain of reversals it reversed."""
        for _ in range(limits.REVERSAL_CHAIN_MAX + 1):
            target = await self.directory.transfer_by_id(target_id)
            if target is None:
                return ""
            if target["kind"] != "reverse" or target["target_id"] is None:
                return str(target["key"])
            target_id = target["target_id"]
        return ""

    # --- settlement ----------------------------------------------------------------------------

    async def _settle(self, t: Terminal, r: PosRequest) -> PosResult:
        """Compare the terminal's totals with the host's for its open batch. Balanced: the
        batch closes and the next opens. Unbalanced: the batch stays open for the upload,
        and the terminal's closing upload (`lines` empty, `totals` given) closes it."""
        lock = self._terminal_locks.setdefault(t.tid, asyncio.Lock())
        async with lock:
            fresh = await self.directory.terminal(t.tid)
            assert fresh is not None
            if r.batch != fresh.batch:
                # The same settlement again (its 0510 was lost): the stored answer again.
                done = await self._just_closed(fresh, r.batch)
                if done is not None and done.balanced and _same_totals(done.terminal, r.totals):
                    return PosResult(
                        Outcome.APPROVED,
                        totals=done.host,
                        balanced=True,
                        batch=r.batch,
                        replayed=True,
                    )
                return PosResult(Outcome.BATCH_MISMATCH, batch=fresh.batch)
            lines = await self.directory.batch_lines(batch_prefix(fresh, fresh.batch))
            host = batch_totals(lines)
            balanced = _same_totals(host, r.totals)
            if balanced:
                await self._close(fresh, host, r.totals, balanced=True)
            return PosResult(Outcome.APPROVED, totals=host, balanced=balanced, batch=fresh.batch)

    async def _upload(self, t: Terminal, r: PosRequest) -> PosResult:
        """Batch upload: the terminal's lines compared with the host's. With no lines, the
        end of the upload: the batch closes, recorded balanced or not by the end totals."""
        lock = self._terminal_locks.setdefault(t.tid, asyncio.Lock())
        async with lock:
            fresh = await self.directory.terminal(t.tid)
            assert fresh is not None
            if r.batch != fresh.batch:
                # The same end of upload again (its 0330 was lost): the stored answer again,
                # never the next batch closed.
                done = None if r.lines else await self._just_closed(fresh, r.batch)
                if done is not None and _same_totals(done.terminal, r.totals):
                    return PosResult(
                        Outcome.APPROVED, totals=done.host, balanced=done.balanced, replayed=True
                    )
                return PosResult(Outcome.BATCH_MISMATCH, batch=fresh.batch)
            prefix = batch_prefix(fresh, fresh.batch)
            lines = await self.directory.batch_lines(prefix)
            host = stans_of(lines, prefix)
            if not r.lines:
                totals = batch_totals(lines)
                balanced = _same_totals(totals, r.totals)
                await self._close(fresh, totals, r.totals, balanced=balanced)
                return PosResult(Outcome.APPROVED, totals=totals, balanced=balanced)
            unmatched = tuple(stan for stan, amount in r.lines if host.get(stan) != amount)
            return PosResult(Outcome.APPROVED, balanced=not unmatched, unmatched=unmatched)

    async def _just_closed(self, t: Terminal, batch: str) -> Settlement | None:
        """The settlement of `batch` when it is the batch that closed last (the one before
        the open batch, in its cycle across a wrap): what a lost 0510 or 0330 answers again.
        An older batch of the same number (a cycle ago) is not it."""
        after, wrapped = next_batch(batch)
        if after != t.batch:
            return None
        return await self.directory.settlement(t.tid, t.batch_cycle - wrapped, batch)

    async def _close(
        self,
        t: Terminal,
        host: tuple[int, int, int, int],
        terminal: tuple[int, int, int, int],
        *,
        balanced: bool,
    ) -> None:
        batch, wrapped = next_batch(t.batch)
        await self.directory.close_batch(
            t,
            host=host,
            terminal=terminal,
            balanced=balanced,
            next_batch=batch,
            next_cycle=t.batch_cycle + 1 if wrapped else t.batch_cycle,
            now_ms=self.clock_ms(),
        )


# --- answers ---------------------------------------------------------------------------------


def _past_limit(account: Account, credits: dict[int, int], amount: int, limit: int) -> bool:
    """Whether crediting `amount` takes the card past `limit`: what it holds now, with the
    credits still waiting for a confirmation and those planned earlier in the call."""
    b = account.balance
    held = available(b) + b.credits_pending + credits.get(account.id, 0)
    return held + amount > limit


def available(b: Balance) -> int:
    """What a stored-value card may spend: credits posted less debits posted and held."""
    return b.credits_posted - b.debits_posted - b.debits_pending


def _answer(res: Result, card: Card | None, amount: int, requested: int | None = None) -> PosResult:
    """The answer to a request the ledger decided. `amount` is what moved; less than
    `requested` is a split tender: approved in part, the remainder due."""
    if res.ok:
        assert res.transfer_id is not None
        balance = None
        if card is not None and res.balances is not None and card.account_id in res.balances:
            balance = available(res.balances[card.account_id])
        partial = requested is not None and amount < requested
        return PosResult(
            Outcome.PARTIAL_APPROVED if partial else Outcome.APPROVED,
            balance=balance,
            amount=amount,
            rrn=rrn_of(res.transfer_id),
            auth_code=auth_code_of(res.transfer_id),
            replayed=res.replayed,
            remainder=requested - amount if partial and requested is not None else None,
        )
    return PosResult(_outcome(res), replayed=res.replayed)


def _reversal_answer(res: Result) -> PosResult:
    if res.ok:
        rrn = "" if res.transfer_id is None else rrn_of(res.transfer_id)
        return PosResult(Outcome.APPROVED, rrn=rrn, replayed=res.replayed)
    if res.code in ("pending_transfer_already_voided", "pending_transfer_expired"):
        return PosResult(Outcome.APPROVED, replayed=True)  # nothing left to undo
    if res.code.startswith("exists_with_different_"):
        return PosResult(Outcome.DUPLICATE_MISMATCH, replayed=res.replayed)
    # The ledger decided it cannot undo this (a floor, say: the refunded money is spent):
    # the terminal must stop sending it, so 12; the back office settles it by hand.
    log.warning(
        "reversal refused by the ledger",
        extra={"code": res.original_code or res.code, "seq": res.seq},
    )
    return PosResult(Outcome.ALREADY_REVERSED, replayed=res.replayed)


def _same_totals(host: tuple[int, int, int, int], terminal: tuple[int, int, int, int]) -> bool:
    """Amounts exactly; counts modulo 1000, as three digits carry them."""
    return (
        host[0] == terminal[0]
        and host[1] % COUNT_MODULUS == terminal[1] % COUNT_MODULUS
        and host[2] == terminal[2]
        and host[3] % COUNT_MODULUS == terminal[3] % COUNT_MODULUS
    )


def _outcome(res: Result) -> Outcome:
    if res.code.startswith("exists_with_different_"):
        return Outcome.DUPLICATE_MISMATCH
    code = res.original_code if res.code == "id_already_failed" else res.code
    if code is not None and code.startswith("exists_with_different_"):
        return Outcome.DUPLICATE_MISMATCH
    return _OUTCOME_OF_CODE.get(code or "", Outcome.BAD_REQUEST)


def _matches(original: dict[str, object], card: Card, amount: int | None) -> bool:
    postings = original["postings"]
    assert isinstance(postings, list)
    debit = next((p for p in postings if p[1] == "debit"), None)
    if debit is None or debit[0] != card.account_id:
        return False
    return amount is None or debit[2] == amount


def _of_card(stored: dict[str, Any], card: Card, kind: Kind) -> bool:
    """Whether a stored transfer is this card's purchase (its first leg the card's debit)
    or top-up hold (its last leg the card's credit)."""
    postings = stored["postings"]
    if kind is Kind.PURCHASE:
        first = postings[0]
        return bool(
            stored["reason"] == "purchase"
            and stored["kind"] == "posted"
            and first[0] == card.account_id
            and first[1] == "debit"
        )
    last = postings[-1]
    return bool(
        stored["reason"] == "topup"
        and stored["kind"] == "pending"
        and last[0] == card.account_id
        and last[1] == "credit"
    )


def _metadata(t: Terminal, r: PosRequest, extra: dict[str, str] | None = None) -> Metadata:
    """Sorted by name, as the ledger keeps metadata; empty values left out."""
    pairs = {
        "batch": r.batch,
        "operator": r.operator,
        "stan": r.stan,
        "store": t.store,
        "terminal": t.tid,
    }
    if extra:
        pairs.update(extra)
    return tuple(sorted((name, value) for name, value in pairs.items() if value))


def _yymm(now_ms: int) -> str:
    return time.strftime("%y%m", time.gmtime(now_ms / 1000 + 8 * 3600))  # Asia/Shanghai
