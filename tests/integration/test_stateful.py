"""Random operation sequences against the real ledger and an independent in-memory model.

A hypothesis state machine submits random requests (transfers posted and held, posts in full
and in part, voids, expiries driven by a fake clock, linked groups, freezes, repeated and
altered idempotency keys) to a `Ledger` on a real database, several requests at once so group
commit batches them. The model below is written from the ledger's documented semantics, not
from `cardcore.ledger.decide`. After every step the results, every balance, the floors, the
journal replay (hash chain, zero-sum postings, balances) and the idempotency records must agree.

Each example runs on its own copy of the test's freshly migrated database (see `Databases`).
"""

from __future__ import annotations

import asyncio
import itertools
import shutil
from collections.abc import Coroutine, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import asyncpg
import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.internal.conjecture import engine as hypothesis_engine
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import select
from sqlalchemy.engine import make_url

from cardcore.db import make_engine
from cardcore.ledger import schema
from cardcore.ledger.model import (
    AccountFlags,
    AssetKind,
    Balance,
    CreateAccount,
    CreateAsset,
    CreateTransfer,
    Op,
    Posting,
    PostPending,
    Result,
    SetAccountFrozen,
    Side,
    VoidPending,
)
from cardcore.ledger.service import Ledger
from cardcore.ledger.store import LedgerStore
from cardcore.ledger.writer import Writer
from cardcore.metrics import Metrics

T = TypeVar("T")
Keyed = CreateTransfer | PostPending | VoidPending
IKey = tuple[str, str]  # (client, key)

ASSETS = frozenset({"CNY", "PTS"})
MISSING_ACCOUNT = 10**15  # no account has this id
MISSING_TRANSFER = 10**15  # no transfer has this id
REASONS = ("", "sale", "refund")
METADATA: tuple[tuple[tuple[str, str], ...], ...] = ((), (("store", "S1"),), (("store", "S2"),))
TIMEOUTS = (None, 1, 5, 30)
EPOCH_MS = 1_900_000_000_000
# Every clock step is at least the writer's expiry scan interval (250 ms), so the first batch
# after a step scans and releases every hold due by then: the model can say when holds expire.
CLOCK_STEPS_MS = (250, 1000, 5000)
# The order in which a repeated key's request is compared with the first one.
REQUEST_FIELDS = (
    "op",
    "asset",
    "postings",
    "pending",
    "timeout_s",
    "pending_id",
    "amount",
    "reason",
    "metadata",
)
OP_KINDS = (
    ("transfer",) * 2
    + ("hold",) * 3
    + ("post",) * 2
    + ("void", "repeat", "alter", "retry_failed", "freeze")
)
TARGETS = ("open hold",) * 5 + ("any hold", "not a hold", "missing")  # of a post or void
POST_AMOUNTS = ("none", "none", "full", "part", "zero", "over")
SPLITS_PCT = (0,) * 6 + (30, 50)  # the first credit's share, when a transfer has two
ALTER_FIELDS = (
    "reason",
    "metadata",
    "postings",
    "pending",
    "timeout_s",
    "asset",
    "pending_id",
    "op",
    "amount",
)
FREEZE = (False, None, False, True)  # unfreezing is likelier, so accounts do not stay frozen
FUNDING = 500  # what each account with a floor starts with; transfers move up to 1000
# Drawn once per new transfer; the first (none) most of the time, and hypothesis shrinks to it.
TRANSFER_FLAWS = ("",) * 20 + (
    "zero amount",
    "same account",
    "points account",
    "missing account",
    "points asset",
    "unknown asset",
    "unbalanced",
)
KEPT_FOR_EVER_EXCEPT = frozenset(
    {"id_already_failed", "linked_event_failed", "linked_event_chain_open"}
)


# --- the model -----------------------------------------------------------------------------


@dataclass
class ModelAccount:
    id: int
    asset: str
    no_overdraft: bool = False
    no_overcredit: bool = False
    debit_frozen: bool = False
    credit_frozen: bool = False
    debits_posted: int = 0
    credits_posted: int = 0
    debits_pending: int = 0
    credits_pending: int = 0
    version: int = 0

    @property
    def balance(self) -> Balance:
        return Balance(
            self.debits_posted,
            self.credits_posted,
            self.debits_pending,
            self.credits_pending,
            self.version,
        )

    @property
    def flags(self) -> AccountFlags:
        return AccountFlags(
            self.no_overdraft, self.no_overcredit, self.debit_frozen, self.credit_frozen
        )

    def floor_broken(self) -> str | None:
        if self.no_overdraft and self.debits_posted + self.debits_pending > self.credits_posted:
            return "exceeds_credits"
        if self.no_overcredit and self.credits_posted + self.credits_pending > self.debits_posted:
            return "exceeds_debits"
        return None


@dataclass
class ModelHold:
    id: int
    legs: tuple[Posting, ...]
    expires_at_ms: int | None
    state: str = "open"  # open | posted | voided | expired


@dataclass(frozen=True)
class Applied:
    request: dict[str, object]
    transfer_id: int


@dataclass(frozen=True)
class Failed:
    request: dict[str, object]
    code: str


@dataclass
class Book:
    """All the model knows; copied whole to roll a linked group back."""

    accounts: dict[int, ModelAccount] = field(default_factory=dict)
    holds: dict[int, ModelHold] = field(default_factory=dict)
    settled: set[int] = field(default_factory=set)  # transfers that are not holds
    keys: dict[IKey, Applied | Failed] = field(default_factory=dict)

    def copy(self) -> Book:
        return Book(
            {aid: replace(a) for aid, a in self.accounts.items()},
            {hid: replace(h) for hid, h in self.holds.items()},
            set(self.settled),
            dict(self.keys),  # the records themselves are never changed
        )


@dataclass(frozen=True)
class Expect:
    code: str
    replayed: bool = False
    transfer_id: int | None = None  # for a replay: the first transfer's id
    original_code: str | None = None  # for id_already_failed


ALREADY = {
    "posted": "pending_transfer_already_posted",
    "voided": "pending_transfer_already_voided",
    "expired": "pending_transfer_expired",
}


def kept_for_ever(code: str) -> bool:
    """A business failure stays with its key; answers about the key itself do not."""
    return not code.startswith("exists_with_different_") and code not in KEPT_FOR_EVER_EXCEPT


def first_difference(a: dict[str, object], b: dict[str, object]) -> str | None:
    for name in REQUEST_FIELDS:
        if a.get(name) != b.get(name):
            return name
    return None


class Model:
    def __init__(self) -> None:
        self.book = Book()
        self._placeholders = itertools.count(-1, -1)

    # requests and keys

    def request(self, op: Keyed) -> dict[str, object]:
        """What makes two requests under one key the same request."""
        if isinstance(op, CreateTransfer):
            return {
                "op": "transfer",
                "asset": op.asset,
                "postings": tuple((p.account_id, p.side, p.amount) for p in op.postings),
                "pending": op.pending,
                "timeout_s": op.timeout_s if op.pending else None,  # only holds time out
                "reason": op.reason,
                "metadata": op.metadata,
            }
        if isinstance(op, PostPending):
            amount = op.amount
            hold = self.book.holds.get(op.pending_id)
            if hold is not None and all(leg.amount == amount for leg in hold.legs):
                amount = None  # the full amount, spelled out, is the same as no amount
            return {
                "op": "post",
                "pending_id": op.pending_id,
                "amount": amount,
                "reason": op.reason,
                "metadata": op.metadata,
            }
        return {
            "op": "void",
            "pending_id": op.pending_id,
            "reason": op.reason,
            "metadata": op.metadata,
        }

    def _seen(self, op: Keyed) -> Expect | None:
        first = self.book.keys.get((op.client, op.key))
        if first is None:
            return None
        differs = first_difference(self.request(op), first.request)
        if differs is not None:
            return Expect(f"exists_with_different_{differs}")
        if isinstance(first, Applied):
            return Expect("ok", replayed=True, transfer_id=first.transfer_id)
        return Expect("id_already_failed", original_code=first.code)

    def _remember_failure(self, op: Op, code: str) -> None:
        if isinstance(op, CreateTransfer | PostPending | VoidPending) and kept_for_ever(code):
            self.book.keys[(op.client, op.key)] = Failed(self.request(op), code)

    # balances

    def _move(self, moves: list[tuple[int, Side, int, int]]) -> str | None:
        """Apply (account, side, posted delta, pending delta) to all or, on a floor, none."""
        after = []
        for account_id, side, posted, pending in moves:
            a = replace(self.book.accounts[account_id])
            if side is Side.DEBIT:
                a.debits_posted += posted
                a.debits_pending += pending
            else:
                a.credits_posted += posted
                a.credits_pending += pending
            a.version += 1
            broken = a.floor_broken()
            if broken is not None:
                return broken
            after.append(a)
        for a in after:
            self.book.accounts[a.id] = a
        return None

    def expire_due(self, now_ms: int) -> None:
        for hold in sorted(self.book.holds.values(), key=lambda h: h.id):
            due = hold.expires_at_ms is not None and hold.expires_at_ms <= now_ms
            if hold.state == "open" and due:
                broken = self._move([(p.account_id, p.side, 0, -p.amount) for p in hold.legs])
                assert broken is None, (hold, broken)  # a release never breaks a floor
                hold.state = "expired"

    # operations

    def decide_request(self, ops: Sequence[Op], got: Sequence[Result], now_ms: int) -> list[Expect]:
        """The expected answers to one request; `got` supplies the ids of new transfers."""
        expects: list[Expect] = []
        start = 0
        while start < len(ops):
            end = start
            while end < len(ops) and ops[end].linked:
                end += 1
            if end == len(ops):  # the request ends inside a linked group
                expects += [Expect("linked_event_chain_open")] * (end - start)
                break
            before = self.book.copy() if end > start else self.book  # a single op fails clean
            outcome: list[Expect] = []
            for i in range(start, end + 1):
                outcome.append(self._one(ops[i], got[i], now_ms))
                if outcome[-1].code != "ok":
                    break
            if outcome[-1].code != "ok":
                self.book = before  # all or nothing
                failed = len(outcome) - 1
                self._remember_failure(ops[start + failed], outcome[-1].code)
                outcome = [
                    outcome[k] if k == failed else Expect("linked_event_failed")
                    for k in range(end + 1 - start)
                ]
            expects += outcome
            start = end + 1
        return expects

    def _one(self, op: Op, got: Result, now_ms: int) -> Expect:
        if isinstance(op, CreateTransfer):
            return self._transfer(op, got, now_ms)
        if isinstance(op, PostPending | VoidPending):
            return self._resolve(op, got)
        assert isinstance(op, SetAccountFrozen), op
        return self._freeze(op)

    def _new_id(self, got: Result) -> int:
        return got.transfer_id if got.transfer_id is not None else next(self._placeholders)

    def _transfer(self, op: CreateTransfer, got: Result, now_ms: int) -> Expect:
        seen = self._seen(op)
        if seen is not None:
            return seen
        if op.asset not in ASSETS:
            return Expect("asset_not_found")
        used: set[int] = set()
        for p in op.postings:
            if p.amount <= 0:
                return Expect("amount_must_be_positive")
            if p.account_id in used:
                return Expect("accounts_must_be_different")
            used.add(p.account_id)
        debits = sum(p.amount for p in op.postings if p.side is Side.DEBIT)
        credits = sum(p.amount for p in op.postings if p.side is Side.CREDIT)
        if len(op.postings) < 2 or debits != credits:
            return Expect("postings_unbalanced")
        for p in op.postings:
            account = self.book.accounts.get(p.account_id)
            if account is None:
                return Expect("account_not_found")
            if account.asset != op.asset:
                return Expect("account_asset_mismatch")
            if p.side is Side.DEBIT and account.debit_frozen:
                return Expect("debit_account_frozen")
            if p.side is Side.CREDIT and account.credit_frozen:
                return Expect("credit_account_frozen")
        if op.pending:
            moves = [(p.account_id, p.side, 0, p.amount) for p in op.postings]
        else:
            moves = [(p.account_id, p.side, p.amount, 0) for p in op.postings]
        broken = self._move(moves)
        if broken is not None:
            return Expect(broken)
        tid = self._new_id(got)
        if op.pending:
            expires = None if op.timeout_s is None else now_ms + op.timeout_s * 1000
            self.book.holds[tid] = ModelHold(tid, op.postings, expires)
        else:
            self.book.settled.add(tid)
        self.book.keys[(op.client, op.key)] = Applied(self.request(op), tid)
        return Expect("ok")

    def _resolve(self, op: PostPending | VoidPending, got: Result) -> Expect:
        seen = self._seen(op)
        if seen is not None:
            return seen
        hold = self.book.holds.get(op.pending_id)
        if hold is None:
            if op.pending_id in self.book.settled:
                return Expect("pending_transfer_not_pending")
            return Expect("pending_transfer_not_found")
        if hold.state != "open":
            return Expect(ALREADY[hold.state])
        posted = [0] * len(hold.legs)
        if isinstance(op, PostPending):
            posted = [leg.amount for leg in hold.legs]
            if op.amount is not None:
                if op.amount <= 0:
                    return Expect("amount_must_be_positive")
                if len({leg.amount for leg in hold.legs}) != 1:
                    return Expect("partial_post_not_uniform")
                if op.amount > hold.legs[0].amount:
                    return Expect("exceeds_pending_amount")
                posted = [op.amount] * len(hold.legs)
        moves = [
            (leg.account_id, leg.side, amount, -leg.amount)
            for leg, amount in zip(hold.legs, posted, strict=True)
        ]
        broken = self._move(moves)
        if broken is not None:
            return Expect(broken)
        tid = self._new_id(got)
        self.book.settled.add(tid)
        request = self.request(op)  # before the state changes: normalising reads the hold
        hold.state = "posted" if isinstance(op, PostPending) else "voided"
        self.book.keys[(op.client, op.key)] = Applied(request, tid)
        return Expect("ok")

    def _freeze(self, op: SetAccountFrozen) -> Expect:
        account = self.book.accounts.get(op.account_id)
        if account is None:
            return Expect("account_not_found")
        debit = account.debit_frozen if op.debit_frozen is None else op.debit_frozen
        credit = account.credit_frozen if op.credit_frozen is None else op.credit_frozen
        if (debit, credit) == (account.debit_frozen, account.credit_frozen):
            return Expect("ok", replayed=True)
        account.debit_frozen, account.credit_frozen = debit, credit
        return Expect("ok")


# --- the state machine ---------------------------------------------------------------------


class Databases:
    """A fresh copy of the test's migrated, still empty database for every example.

    The journal is append-only, so examples cannot share one database: a batch that broke
    the hash chain in one example would fail every later one, and hypothesis could neither
    replay nor shrink a failure alone. A worker thread makes the next copy (0.3 s on
    PostgreSQL) while the current example runs, and drops used ones. Also keeps the fake
    clock, which only moves forward.
    """

    def __init__(self, template_url: str) -> None:
        self.template = make_url(template_url)
        self.postgres = self.template.get_backend_name() == "postgresql"
        self.now_ms = EPOCH_MS
        self._count = itertools.count()
        self._worker = ThreadPoolExecutor(max_workers=1)
        self._next: Future[str] | None = None
        self._live: set[str] = set()  # copies not yet dropped; only the worker touches it

    def take(self) -> str:
        ready = self._next or self._worker.submit(self._create, next(self._count))
        self._next = self._worker.submit(self._create, next(self._count))
        return ready.result()

    def give_back(self, url: str) -> None:
        self._worker.submit(self._drop, url)

    def close(self) -> None:
        """Drop every copy left, the next one included, and stop the worker."""
        self._worker.submit(self._drop_all)
        self._worker.shutdown(wait=True)

    # in the worker thread

    def _create(self, n: int) -> str:
        template = self.template.database
        assert template is not None
        if self.postgres:
            name = f"{template}_x{n}"
            asyncio.run(self._admin(f'CREATE DATABASE "{name}" TEMPLATE "{template}"'))
        else:
            name = str(Path(template).with_name(f"example-{n}.db"))
            shutil.copyfile(template, name)
        url = self.template.set(database=name).render_as_string(hide_password=False)
        self._live.add(url)
        return url

    def _drop(self, url: str) -> None:
        self._live.discard(url)
        database = make_url(url).database
        assert database is not None and database != self.template.database
        if self.postgres:
            asyncio.run(self._admin(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))
            return
        for suffix in ("", "-wal", "-shm"):
            Path(database + suffix).unlink(missing_ok=True)

    def _drop_all(self) -> None:
        for url in sorted(self._live):
            self._drop(url)

    async def _admin(self, statement: str) -> None:
        admin = self.template.set(drivername="postgresql", database="postgres")
        conn = await asyncpg.connect(admin.render_as_string(hide_password=False), timeout=5)
        try:
            await conn.execute(statement)
        finally:
            await conn.close()


class LedgerMachine(RuleBasedStateMachine):
    databases: ClassVar[Databases]

    def __init__(self) -> None:
        super().__init__()
        self.clients = ("pos", "web")
        self.model = Model()
        self.pool: list[Keyed] = []  # every keyed op drawn so far, to repeat or alter
        self.issued: set[int] = set()  # transfer ids the ledger gave this example
        self.keys = itertools.count()
        self.cny: list[int] = []
        self.pts = 0
        self.db_url = self.databases.take()
        self.runner = asyncio.Runner()
        store = LedgerStore(make_engine(self.db_url))
        # No waiting for company: a step enqueues all its requests before the writer wakes.
        writer = Writer(store, Metrics(), batch_wait_ms_max=0, clock_ms=self._clock)
        self.ledger = Ledger(store, writer)
        try:
            self._run(self.ledger.start())
        except BaseException:
            self.teardown()  # hypothesis tears down only machines it got
            raise

    def _clock(self) -> int:
        return self.databases.now_ms

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.runner.run(coro)

    def teardown(self) -> None:
        try:
            self._run(self.ledger.close())
        finally:
            self.runner.close()
            self.databases.give_back(self.db_url)

    # --- submitting and comparing ---------------------------------------------------------

    async def _submit_all(self, requests: list[list[Op]]) -> list[list[Result]]:
        # Enqueued in list order before the writer runs: it batches them, in this order.
        return list(await asyncio.gather(*(self.ledger.submit(ops) for ops in requests)))

    def _submit_and_compare(self, requests: list[list[Op]]) -> None:
        answers = self._run(self._submit_all(requests))
        for ops, got in zip(requests, answers, strict=True):
            assert len(got) == len(ops), (ops, got)
            expected = self.model.decide_request(ops, got, self.databases.now_ms)
            for i, (op, want, res) in enumerate(zip(ops, expected, got, strict=True)):
                where = f"op {i} {op}\n  expected {want}\n  got      {res}\n  request {ops}"
                self._compare(op, want, res, where)

    def _compare(self, op: Op, want: Expect, got: Result, where: str) -> None:
        assert got.code == want.code, where
        assert got.ok == (want.code == "ok"), where
        if want.code == "id_already_failed":
            assert got.original_code == want.original_code, where
        if want.code != "ok":
            return
        assert got.replayed == want.replayed, where
        if isinstance(op, SetAccountFrozen):
            return
        if want.replayed:
            assert got.transfer_id == want.transfer_id, where
        else:
            assert got.transfer_id is not None and got.transfer_id not in self.issued, where
            self.issued.add(got.transfer_id)

    # --- drawing operations ---------------------------------------------------------------

    def _key(self) -> str:
        return f"k{next(self.keys)}"

    # One draw per request shape and one per operation (a dictionary, printed with its names
    # in a failing example): data.draw is costly, and there are thousands of operations.

    def _pending_id(self, target: str, pick: int) -> int:
        holds = self.model.book.holds
        open_holds = sorted(hid for hid, hold in holds.items() if hold.state == "open")
        ids = {
            "open hold": open_holds,
            "any hold": sorted(holds),
            "not a hold": sorted(self.model.book.settled),
            "missing": [MISSING_TRANSFER],
        }[target]
        ids = ids or open_holds or sorted(holds) or [MISSING_TRANSFER]
        return ids[pick % len(ids)]

    def _post_amount(self, pending_id: int, amount: str, part_pct: int) -> int | None:
        hold = self.model.book.holds.get(pending_id)
        full = hold.legs[0].amount if hold is not None else 100
        return {
            "none": None,
            "full": full,
            "part": max(1, full * part_pct // 100),
            "zero": 0,
            "over": full + 1,
        }[amount]

    def _transfer(self, f: dict[str, Any], *, pending: bool) -> CreateTransfer:
        """A valid transfer between distinct accounts, or one with the drawn flaw."""
        flaw, amount, asset = f["flaw"], f["amount"], "CNY"
        debit, credit, *rest = f["accounts"]
        if flaw == "zero amount":
            amount = 0
        elif flaw == "same account":
            credit = debit
        elif flaw == "points account":
            credit = self.pts
        elif flaw == "missing account":
            debit = MISSING_ACCOUNT
        elif flaw in ("points asset", "unknown asset"):
            asset = "PTS" if flaw == "points asset" else "NOPE"
        postings: tuple[Posting, ...] = (
            Posting(debit, Side.DEBIT, amount),
            Posting(credit, Side.CREDIT, amount),
        )
        part = amount * f["split_pct"] // 100
        if flaw == "unbalanced":
            postings = (postings[0], Posting(credit, Side.CREDIT, amount + 1))
        elif rest and 0 < part < amount:  # a hold with unequal legs cannot be posted in part
            postings = (
                Posting(debit, Side.DEBIT, amount),
                Posting(credit, Side.CREDIT, part),
                Posting(rest[0], Side.CREDIT, amount - part),
            )
        return CreateTransfer(
            client=f["client"],
            key=self._key(),
            asset=asset,
            postings=postings,
            pending=pending,
            timeout_s=f["timeout_s"] if pending else None,
            reason=f["reason"],
            metadata=f["metadata"],
        )

    def _resolution(self, f: dict[str, Any], *, post: bool) -> PostPending | VoidPending:
        pid = self._pending_id(f["target"], f["pick"])
        if post:
            amount = self._post_amount(pid, f["amount"], f["part_pct"])
            return PostPending(f["client"], self._key(), pid, amount, f["reason"], f["metadata"])
        return VoidPending(f["client"], self._key(), pid, f["reason"], f["metadata"])

    def _alter(self, f: dict[str, Any]) -> Keyed:
        """The same key with one field changed (which may, by chance, change nothing)."""

        def other(values: Sequence[T], value: T) -> T:
            return values[(list(values).index(value) + 1) % len(values)]

        op: Keyed = f["earlier"]
        what = f["field"]
        if isinstance(op, CreateTransfer):
            if what == "postings":
                first, second, *rest = op.postings
                bigger = (
                    replace(first, amount=first.amount + 1),
                    replace(second, amount=second.amount + 1),
                )
                return replace(op, postings=(*bigger, *rest))
            if what == "pending":
                return replace(op, pending=not op.pending)
            if what == "timeout_s":
                return replace(op, timeout_s=other(TIMEOUTS, op.timeout_s))
            if what == "asset":
                return replace(op, asset="PTS" if op.asset == "CNY" else "CNY")
        else:
            if what == "pending_id":
                return replace(op, pending_id=self._pending_id(f["target"], f["pick"]))
            if what == "op" and isinstance(op, PostPending):
                return VoidPending(op.client, op.key, op.pending_id, op.reason, op.metadata)
            if what == "op" and isinstance(op, VoidPending):
                return PostPending(op.client, op.key, op.pending_id, None, op.reason, op.metadata)
            if what == "amount" and isinstance(op, PostPending):
                amount = self._post_amount(op.pending_id, f["amount"], f["part_pct"])
                return replace(op, amount=amount)
        if what == "metadata":
            return replace(op, metadata=other(METADATA, op.metadata))
        return replace(op, reason=other(REASONS, op.reason))

    def _draw_op(self, data: st.DataObject, kind: str) -> Op:
        request: dict[str, st.SearchStrategy[Any]] = {
            "client": st.sampled_from(self.clients),
            "reason": st.sampled_from(REASONS),
            "metadata": st.sampled_from(METADATA),
        }
        target: dict[str, st.SearchStrategy[Any]] = {
            "target": st.sampled_from(TARGETS),
            "pick": st.integers(0, 1000),
            "amount": st.sampled_from(POST_AMOUNTS),
            "part_pct": st.integers(1, 99),
        }
        keys = self.model.book.keys
        failed = [op for op in self.pool if isinstance(keys.get((op.client, op.key)), Failed)]
        if kind == "repeat" and self.pool:
            earlier: Keyed = data.draw(st.sampled_from(self.pool), label="repeat")
            return earlier
        if kind == "retry_failed" and failed:
            return data.draw(st.sampled_from(failed), label="retry failed")
        if kind == "alter" and self.pool:
            fields: dict[str, st.SearchStrategy[Any]] = {
                "earlier": st.sampled_from(self.pool),
                "field": st.sampled_from(ALTER_FIELDS),
            }
            op = self._alter(data.draw(st.fixed_dictionaries({**fields, **target}), label="alter"))
        elif kind == "freeze":
            freeze: dict[str, st.SearchStrategy[Any]] = {
                "account": st.sampled_from([*self.cny, MISSING_ACCOUNT]),
                "debit": st.sampled_from(FREEZE),
                "credit": st.sampled_from(FREEZE),
            }
            f = data.draw(st.fixed_dictionaries(freeze), label="freeze")
            return SetAccountFrozen(f["account"], f["debit"], f["credit"])
        elif kind in ("post", "void"):
            f = data.draw(st.fixed_dictionaries({**target, **request}), label=kind)
            op = self._resolution(f, post=kind == "post")
        else:
            transfer: dict[str, st.SearchStrategy[Any]] = {
                "flaw": st.sampled_from(TRANSFER_FLAWS),
                "accounts": st.permutations(self.cny),
                "amount": st.integers(1, 1000),
                "split_pct": st.sampled_from(SPLITS_PCT),
                "timeout_s": st.sampled_from(TIMEOUTS),
                **request,
            }
            label = "hold" if kind == "hold" else "transfer"
            f = data.draw(st.fixed_dictionaries(transfer), label=label)
            op = self._transfer(f, pending=kind == "hold")
        self.pool.append(op)
        return op

    def _draw_request(self, data: st.DataObject) -> list[Op]:
        shape: dict[str, st.SearchStrategy[Any]] = {
            # Links inside a request are common; a request ending in a link is rare.
            "ops": st.lists(
                st.tuples(st.sampled_from(OP_KINDS), st.booleans()), min_size=1, max_size=4
            ),
            "ends_linked": st.sampled_from([False, False, False, False, True]),
        }
        f: dict[str, Any] = data.draw(st.fixed_dictionaries(shape), label="request")
        kinds: list[tuple[str, bool]] = f["ops"]
        ops = []
        for i, (kind, linked) in enumerate(kinds):
            op = self._draw_op(data, kind)
            ops.append(replace(op, linked=f["ends_linked"] if i == len(kinds) - 1 else linked))
        return ops

    # --- rules ------------------------------------------------------------------------------

    @initialize(
        kinds=st.lists(
            st.sampled_from(["plain", "no_overdraft", "no_overcredit"]), min_size=2, max_size=4
        ),
    )
    def open_accounts(self, kinds: list[str]) -> None:
        assets = [
            CreateAsset("CNY", AssetKind.CURRENCY, 2, "Renminbi"),
            CreateAsset("PTS", AssetKind.POINTS, 0, "Points"),
        ]
        assert all(r.ok for r in self._run(self.ledger.submit(assets)))
        specs = [("CNY", "plain"), *(("CNY", kind) for kind in kinds), ("PTS", "plain")]
        creates: list[Op] = [
            CreateAccount(
                asset,
                "LE1",
                "card",
                f"c{i}",
                "stored_value",
                AccountFlags(
                    no_overdraft=kind == "no_overdraft", no_overcredit=kind == "no_overcredit"
                ),
            )
            for i, (asset, kind) in enumerate(specs)
        ]
        results = self._run(self.ledger.submit(creates))
        for (asset, kind), res in zip(specs, results, strict=True):
            assert res.ok and not res.replayed and res.account_id is not None, res
            self.model.book.accounts[res.account_id] = ModelAccount(
                res.account_id,
                asset,
                no_overdraft=kind == "no_overdraft",
                no_overcredit=kind == "no_overcredit",
            )
            if asset == "CNY":
                self.cny.append(res.account_id)
            else:
                self.pts = res.account_id
        source = self.cny[0]  # no floor: funds the others
        funding: list[Op] = []
        for i, kind in enumerate(kinds, start=1):
            aid = self.cny[i]
            debit, credit = (source, aid) if kind == "no_overdraft" else (aid, source)
            funding.append(
                CreateTransfer(
                    self.clients[0],
                    self._key(),
                    "CNY",
                    (Posting(debit, Side.DEBIT, FUNDING), Posting(credit, Side.CREDIT, FUNDING)),
                )
            )
        self._submit_and_compare([funding])

    @rule(data=st.data(), step_ms=st.sampled_from((0, 0, 0, *CLOCK_STEPS_MS)))
    def submit_requests(self, data: st.DataObject, step_ms: int) -> None:
        """Time may pass; then one to three requests at once, batched by group commit.

        The only rule: swarm testing would otherwise spend whole examples on the others.
        """
        self.databases.now_ms += step_ms
        self.model.expire_due(self.databases.now_ms)
        count = data.draw(st.integers(1, 3), label="requests")
        requests = [self._draw_request(data) for _ in range(count)]
        self._submit_and_compare(requests)

    # --- after every step -------------------------------------------------------------------

    @invariant()
    def ledger_agrees_with_model(self) -> None:
        self._run(self._check())

    async def _check(self) -> None:
        book = self.model.book
        ids = list(book.accounts)
        accounts = await asyncio.gather(*(self.ledger.account(aid) for aid in ids))
        for aid, stored in zip(ids, accounts, strict=True):
            want = book.accounts[aid]
            assert stored is not None, aid
            assert stored.balance == want.balance, (aid, stored.balance, want.balance)
            assert stored.info.flags == want.flags, (aid, stored.info.flags, want.flags)
            b, flags = stored.balance, stored.info.flags
            if flags.no_overdraft:
                assert b.debits_posted + b.debits_pending <= b.credits_posted, (aid, b)
            if flags.no_overcredit:
                assert b.credits_posted + b.credits_pending <= b.debits_posted, (aid, b)
        # Replays the whole journal: hash chain, zero-sum transfers, balances after each entry.
        await self.ledger.store.verify(100)
        t, f, h = schema.transfers, schema.failures, schema.open_holds
        async with self.ledger.store.engine.connect() as conn:
            applied = (
                await conn.execute(
                    select(t.c.client, t.c.key, t.c.id).where(t.c.client.in_(self.clients))
                )
            ).all()
            failed = (
                await conn.execute(
                    select(f.c.client, f.c.key, f.c.code).where(f.c.client.in_(self.clients))
                )
            ).all()
            open_holds = (
                (
                    await conn.execute(
                        select(h.c.transfer_id).where(h.c.transfer_id.in_(list(book.holds)))
                    )
                )
                .scalars()
                .all()
            )
        pairs = [(c, k) for c, k, _ in applied]
        assert len(pairs) == len(set(pairs)), "a key was applied twice"
        want_applied = {k: r.transfer_id for k, r in book.keys.items() if isinstance(r, Applied)}
        assert {(c, k): i for c, k, i in applied} == want_applied
        want_failed = {k: r.code for k, r in book.keys.items() if isinstance(r, Failed)}
        assert {(c, k): code for c, k, code in failed} == want_failed
        assert not set(want_applied) & set(want_failed)
        want_open = {hid for hid, hold in book.holds.items() if hold.state == "open"}
        assert set(open_holds) == want_open


SHRINK_SECONDS_MAX = 60
SETTINGS = settings(
    max_examples=20,
    stateful_step_count=20,
    deadline=None,
    # No explain phase: its line tracer makes every example after a failure many times slower.
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.mark.timeout(240)
def test_random_operations_keep_ledger_balances_journal_and_keys_equal_to_model(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Hypothesis shrinks for up to 300 s; a failure must be reported before the timeout.
    monkeypatch.setattr(hypothesis_engine, "MAX_SHRINKING_SECONDS", SHRINK_SECONDS_MAX)

    class Machine(LedgerMachine):
        databases = Databases(db_url)

    try:
        run_state_machine_as_test(Machine, settings=SETTINGS)
    finally:
        Machine.databases.close()
