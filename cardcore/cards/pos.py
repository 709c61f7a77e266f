"""The POS use cases: what the host does with each request the front-end gateway forwards.

`PosService.handle` takes many terminals' requests at once (the gateway batches them), reads
what each needs (terminal, card, original transfer), turns each into at most one ledger
operation, submits them all to the writer in one call, so they share a group commit, and
answers each with an `Outcome`. Stored value only for now; points and coupons answer
`function_not_supported` until their issue lands.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from cardcore import limits
from cardcore.cards.directory import Directory
from cardcore.cards.model import (
    CURRENCY,
    NOT_SUPPORTED,
    POS_CLIENT,
    Card,
    Kind,
    Outcome,
    PosRequest,
    PosResult,
    Terminal,
    auth_code_of,
    batch_prefix,
    batch_totals,
    luhn_ok,
    next_batch,
    reversal_key,
    rrn_of,
    stans_of,
    transaction_key,
)
from cardcore.db import DATABASE_ERRORS
from cardcore.ledger.model import (
    Balance,
    CreateTransfer,
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
# Counts in settlement totals are three digits on the wire: compared modulo 1000.
COUNT_MODULUS = 1000


def card_token(token_key: bytes, pan: str) -> str:
    """The keyed hash a card is found by: the PAN itself is never stored or logged."""
    return hmac.new(token_key, pan.encode("ascii"), hashlib.sha256).hexdigest()


def token_key_of(kek: bytes) -> bytes:
    return hmac.new(kek, b"cardcore/card-token/v1", hashlib.sha256).digest()


@dataclass(slots=True)
class _Plan:
    """One request on its way: an answer already, or an op whose result makes the answer."""

    request: PosRequest
    answer: PosResult | None = None
    op: Op | None = None
    card: Card | None = None
    finish: Callable[[Result], PosResult] | None = None


class PosService:
    def __init__(
        self,
        ledger: Ledger,
        directory: Directory,
        token_key: bytes,
        clock_ms: Callable[[], int] | None = None,
    ) -> None:
        self.ledger = ledger
        self.directory = directory
        self.token_key = token_key
        self.clock_ms = clock_ms or (lambda: int(time.time() * 1000))
        self._terminal_locks: dict[str, asyncio.Lock] = {}

    async def handle(self, requests: Sequence[PosRequest]) -> list[PosResult]:
        """One answer per request, in order. A failure while reading for one request (a
        database timeout, say) answers that request `unavailable`, never its neighbours."""
        plans = [await self._plan_or_unavailable(r) for r in requests]
        pending = [p for p in plans if p.op is not None]
        if pending:
            try:
                results = await self.ledger.submit([p.op for p in pending if p.op is not None])
            except (Busy, LedgerUnavailable):
                results = None
            for i, plan in enumerate(pending):
                if results is None:
                    plan.answer = PosResult(Outcome.UNAVAILABLE)
                    continue
                assert plan.finish is not None
                plan.answer = plan.finish(results[i])
        out = []
        for plan in plans:
            assert plan.answer is not None
            try:
                out.append(await self._complete(plan, plan.answer))
            except DATABASE_ERRORS:
                log.exception("POS answer could not be completed")
                out.append(PosResult(Outcome.UNAVAILABLE))
        return out

    async def _plan_or_unavailable(self, r: PosRequest) -> _Plan:
        try:
            return await self._plan(r)
        except DATABASE_ERRORS:
            log.exception("POS request could not be planned", extra={"kind": str(r.kind)})
            return _Plan(r, answer=PosResult(Outcome.UNAVAILABLE))

    async def _complete(self, plan: _Plan, answer: PosResult) -> PosResult:
        """A replayed approval answers what the first attempt answered, with the balance
        stored after it, unless a reversal undid it since: then the resend is declined, or
        the terminal would print an approval for money that went back."""
        resent = answer.replayed and answer.outcome is Outcome.APPROVED and answer.rrn
        undoable = plan.request.kind in UNDOABLE
        if resent and undoable and await self.directory.undone(int(answer.rrn)):
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
        if r.kind in NOT_SUPPORTED:
            plan.answer = PosResult(Outcome.FUNCTION_NOT_SUPPORTED)
            return plan
        if r.kind is Kind.SETTLE:
            plan.answer = await self._settle(terminal, r)
            return plan
        if r.kind is Kind.UPLOAD:
            plan.answer = await self._upload(terminal, r)
            return plan
        # A reversal may come after its batch closed (store and forward): it never waits.
        if r.batch != terminal.batch and r.kind is not Kind.REVERSE:
            plan.answer = PosResult(Outcome.BATCH_MISMATCH, batch=terminal.batch)
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

    async def _card(self, plan: _Plan, *, giving_back: bool = False) -> Card | None:
        """The request's card, or None with the answer set. Giving money back (a void, a
        refund) is never refused for expiry: a sale made before it must stay undoable."""
        r = plan.request
        if not r.card or not luhn_ok(r.card):
            plan.answer = PosResult(Outcome.CARD_NOT_FOUND)
            return None
        card = await self.directory.card(card_token(self.token_key, r.card))
        if card is None or card.state != "active":
            plan.answer = PosResult(Outcome.CARD_NOT_FOUND)
            return None
        if not giving_back and card.expires and _yymm(self.clock_ms()) > card.expires:
            plan.answer = PosResult(Outcome.CARD_EXPIRED)
            return None
        plan.card = card
        return card

    async def _paying_card(self, plan: _Plan) -> Card | None:
        """The card of a request that moves an amount; None with the answer set."""
        if plan.request.amount <= 0:
            plan.answer = PosResult(Outcome.BAD_REQUEST)
            return None
        return await self._card(plan)

    async def _inquiry(self, plan: _Plan, _terminal: Terminal) -> None:
        card = await self._card(plan)
        if card is None:
            return
        account = await self.ledger.account(card.account_id)
        if account is None:
            plan.answer = PosResult(Outcome.CARD_NOT_FOUND)
            return
        if account.info.flags.debit_frozen:
            plan.answer = PosResult(Outcome.CARD_FROZEN)
            return
        plan.answer = PosResult(Outcome.APPROVED, balance=available(account.balance))

    async def _purchase(self, plan: _Plan, t: Terminal) -> None:
        r = plan.request
        card = await self._paying_card(plan)
        if card is None:
            return
        plan.op = CreateTransfer(
            client=POS_CLIENT,
            key=transaction_key(t, r.batch, r.stan),
            asset=CURRENCY,
            postings=(
                Posting(card.account_id, Side.DEBIT, r.amount),
                Posting(t.sales_account, Side.CREDIT, r.amount),
            ),
            reason="purchase",
            metadata=_metadata(t, r),
        )
        plan.finish = lambda res: _answer(res, card, r.amount)

    async def _topup(self, plan: _Plan, t: Terminal) -> None:
        r = plan.request
        card = await self._paying_card(plan)
        if card is None:
            return
        if card.balance_max:
            account = await self.ledger.account(card.account_id)
            if account is not None and (
                available(account.balance) + account.balance.credits_pending + r.amount
                > card.balance_max
            ):
                plan.answer = PosResult(Outcome.OVER_LIMIT)
                return
        # A hold until the terminal confirms (0220); it lapses by itself if it never does.
        plan.op = CreateTransfer(
            client=POS_CLIENT,
            key=transaction_key(t, r.batch, r.stan),
            asset=CURRENCY,
            postings=(
                Posting(t.cash_account, Side.DEBIT, r.amount),
                Posting(card.account_id, Side.CREDIT, r.amount),
            ),
            pending=True,
            timeout_s=limits.TOPUP_CONFIRM_S,
            reason="topup",
            metadata=_metadata(t, r),
        )
        plan.finish = lambda res: _answer(res, card, r.amount)

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
        if not _matches(original, card, r.amount):
            plan.answer = PosResult(Outcome.ORIGINAL_MISMATCH)
            return
        plan.op = Reverse(
            client=POS_CLIENT,
            key=transaction_key(t, r.batch, r.stan),
            target_key=target_key,
            reason="void",
            metadata=_metadata(t, r),
        )
        plan.finish = lambda res: _answer(res, card, r.amount)

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
        if not _matches(original, card, None):
            plan.answer = PosResult(Outcome.ORIGINAL_MISMATCH)
            return
        plan.op = Refund(
            client=POS_CLIENT,
            key=transaction_key(t, r.batch, r.stan),
            target_key=original["key"],
            amount=r.amount,
            reason="refund",
            metadata=_metadata(t, r),
        )
        plan.finish = lambda res: _answer(res, card, r.amount)

    async def _reverse(self, plan: _Plan, t: Terminal) -> None:
        r = plan.request
        target_key = transaction_key(t, r.batch, r.stan)
        key = reversal_key(t, r.batch, r.stan)
        original = await self.directory.transfer_by_key(target_key)
        if original is not None and original["kind"] == "pending":
            plan.op = VoidPending(
                client=POS_CLIENT,
                key=key,
                pending_id=original["id"],
                reason="reversal",
                metadata=_metadata(t, r),
            )
        else:
            plan.op = Reverse(
                client=POS_CLIENT,
                key=key,
                target_key=target_key,
                tombstone=True,
                reason="reversal",
                metadata=_metadata(t, r),
            )
        plan.finish = _reversal_answer

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
                done = await self.directory.settlement(fresh.tid, r.batch)
                if done is not None and _same_totals(done[1], r.totals):
                    return PosResult(
                        Outcome.APPROVED,
                        totals=done[0],
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


def available(b: Balance) -> int:
    """What a stored-value card may spend: credits posted less debits posted and held."""
    return b.credits_posted - b.debits_posted - b.debits_pending


def _answer(res: Result, card: Card | None, amount: int) -> PosResult:
    if res.ok:
        assert res.transfer_id is not None
        balance = None
        if card is not None and res.balances is not None and card.account_id in res.balances:
            balance = available(res.balances[card.account_id])
        return PosResult(
            Outcome.APPROVED,
            balance=balance,
            amount=amount,
            rrn=rrn_of(res.transfer_id),
            auth_code=auth_code_of(res.transfer_id),
            replayed=res.replayed,
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


def _metadata(t: Terminal, r: PosRequest) -> tuple[tuple[str, str], ...]:
    """Sorted by name, as the ledger keeps metadata (built in order: this runs per request)."""
    pairs = (
        ("batch", r.batch),
        ("operator", r.operator),
        ("stan", r.stan),
        ("store", t.store),
        ("terminal", t.tid),
    )
    return tuple(pair for pair in pairs if pair[1])


def _yymm(now_ms: int) -> str:
    return time.strftime("%y%m", time.gmtime(now_ms / 1000 + 8 * 3600))  # Asia/Shanghai
