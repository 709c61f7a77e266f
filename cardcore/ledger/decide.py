"""Decide a batch of operations in memory, in arrival order. Pure: data in, effects out.

The writer reads a `LedgerView` (every account, hold and idempotency record the batch
touches), calls `decide_batch`, writes the returned `BatchEffects` and commits once. A failed
operation fails only itself, or its whole linked group; it never changes anything.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from cardcore import limits
from cardcore.ledger import codes
from cardcore.ledger.model import (
    LEDGER_CLIENT,
    Account,
    AccountEvent,
    AccountFlags,
    AccountInfo,
    Asset,
    Balance,
    CreateAccount,
    CreateAsset,
    CreateTransfer,
    Entry,
    ExpirePending,
    Failure,
    IdCounters,
    KeyedOp,
    LedgerView,
    Op,
    OutboxEvent,
    PendingState,
    Posting,
    PostPending,
    Refund,
    Result,
    Reverse,
    SetAccountFrozen,
    Side,
    Transfer,
    TransferKind,
    VoidPending,
    natural_key,
)

EVENT_BY_KIND = {
    TransferKind.POSTED: "transfer.posted",
    TransferKind.PENDING: "transfer.pending",
    TransferKind.POST: "transfer.posted",
    TransferKind.VOID: "transfer.voided",
    TransferKind.EXPIRE: "transfer.expired",
    TransferKind.REVERSE: "transfer.reversed",
    TransferKind.REFUND: "transfer.refunded",
}

# What `reverse` may undo and `refund` may give back: transfers that moved posted balances.
# A reversal may itself be reversed (a terminal reversing a void whose reply it lost): its
# target is then live again, though never reversible a second time.
REVERSIBLE = frozenset(
    {TransferKind.POSTED, TransferKind.POST, TransferKind.REFUND, TransferKind.REVERSE}
)
_REFUNDABLE = frozenset({TransferKind.POSTED, TransferKind.POST})
TOMBSTONE_CODE = "reversed_before_arrival"
# A tombstoning reverse that found nothing to undo keeps its key with this record, so the
# key replays (and refuses another request) like any other.
NO_EFFECT_CODE = "reversed_nothing"

# The order in which a keyed request is compared with the first one under its key.
REQUEST_FIELDS = (
    "op",
    "asset",
    "postings",
    "pending",
    "timeout_s",
    "pending_id",
    "target_key",
    "amount",
    "reason",
    "metadata",
)


@dataclass(slots=True)
class BatchEffects:
    seq: int
    now_ms: int
    results: list[Result]
    counters: IdCounters
    assets: list[Asset] = field(default_factory=list)
    account_events: list[AccountEvent] = field(default_factory=list)
    transfers: list[Transfer] = field(default_factory=list)
    entries: list[Entry] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    outbox: list[OutboxEvent] = field(default_factory=list)
    opened_pendings: dict[int, int | None] = field(default_factory=dict)  # id -> expires_at_ms
    closed_pendings: list[int] = field(default_factory=list)
    accounts: dict[int, Account] = field(default_factory=dict)  # final state of changed ones
    new_account_ids: set[int] = field(default_factory=set)
    pendings: dict[int, PendingState] = field(default_factory=dict)  # holds made or resolved
    reversed_by: dict[int, int] = field(default_factory=dict)  # targets reversed by the batch
    refunded: dict[int, int] = field(default_factory=dict)  # targets whose refunds changed
    # the kinds of the transfers the batch made and of those it gave back to: the next
    # batch, read before this one commits, judges a chain of reversals by them
    kinds: dict[int, TransferKind] = field(default_factory=dict)

    @property
    def is_empty(self) -> bool:
        return not (self.assets or self.account_events or self.transfers or self.failures)


class _Failed(Exception):
    def __init__(self, code: str, field: str | None = None) -> None:
        super().__init__(code)
        self.code = code
        self.field = field


_MISSING: Any = object()


class _Scratch:
    """The batch's working state, with an undo log so a linked group can be rolled back."""

    def __init__(self, view: LedgerView, counters: IdCounters, seq: int, now_ms: int) -> None:
        self.seq = seq
        self.now_ms = now_ms
        self.assets = dict(view.assets)
        self.accounts = dict(view.accounts)
        self.natural = dict(view.account_ids_by_natural_key)
        self.transfers_by_key = dict(view.transfers_by_key)
        self.failures_by_key = dict(view.failures_by_key)
        self.pendings = dict(view.pendings)
        self.reversed_by = dict(view.reversed_by)
        self.refunded = dict(view.refunded)
        self.kinds = dict(view.kinds)
        self.next = {
            "account": counters.account,
            "transfer": counters.transfer,
            "entry": counters.entry,
            "account_event": counters.account_event,
            "outbox": counters.outbox,
        }
        self.effects = BatchEffects(seq=seq, now_ms=now_ms, results=[], counters=counters)
        self._undo: list[tuple[MutableMapping[Any, Any], Any, Any]] | None = None

    # --- undo log ---------------------------------------------------------------------------

    def set(self, mapping: MutableMapping[Any, Any], key: Any, value: Any) -> None:
        if self._undo is not None:
            self._undo.append((mapping, key, mapping.get(key, _MISSING)))
        mapping[key] = value

    def take_id(self, name: str) -> int:
        value: int = self.next[name]
        self.set(self.next, name, value + 1)
        return value

    def begin_group(self) -> tuple[int, ...]:
        self._undo = []
        e = self.effects
        return (
            len(e.assets),
            len(e.account_events),
            len(e.transfers),
            len(e.entries),
            len(e.outbox),
            len(e.failures),
        )

    def end_group(self, mark: tuple[int, ...] | None) -> None:
        """Keep the group's work (mark is None) or roll it back to `mark`."""
        undo, self._undo = self._undo or [], None
        if mark is None:
            return
        for mapping, key, old in reversed(undo):
            if old is _MISSING:
                del mapping[key]
            else:
                mapping[key] = old
        e = self.effects
        del e.assets[mark[0] :]
        del e.account_events[mark[1] :]
        del e.transfers[mark[2] :]
        del e.entries[mark[3] :]
        del e.outbox[mark[4] :]
        del e.failures[mark[5] :]  # tombstones and no-effect records of the group

    # --- effects ----------------------------------------------------------------------------

    def put_account(self, account: Account) -> None:
        self.set(self.accounts, account.id, account)

    def add_transfer(self, transfer: Transfer, entries: list[Entry]) -> None:
        e = self.effects
        e.transfers.append(transfer)
        e.entries.extend(entries)
        self.set(self.kinds, transfer.id, transfer.kind)
        e.outbox.append(
            OutboxEvent(
                id=self.take_id("outbox"),
                seq=self.seq,
                event=EVENT_BY_KIND[transfer.kind],
                transfer_id=transfer.id,
            )
        )
        if transfer.client != LEDGER_CLIENT:
            self.set(self.transfers_by_key, (transfer.client, transfer.key), transfer)
        if transfer.kind is TransferKind.PENDING:
            self.set(self.pendings, transfer.id, PendingState(transfer, None))
        elif transfer.pending_id is not None:
            held = self.pendings[transfer.pending_id]
            self.set(self.pendings, transfer.pending_id, replace(held, resolved_by=transfer.kind))


def decide_batch(
    requests: Sequence[Sequence[Op]],
    view: LedgerView,
    counters: IdCounters,
    seq: int,
    now_ms: int,
) -> BatchEffects:
    """Decide every request's operations in order; `results` answers them all, flattened.

    A linked group never reaches past the end of its request: a request whose last operation
    is linked answers `linked_event_chain_open` for that group.

    Every open hold in `view` whose timeout has passed is expired first (the writer loads the
    ones its expiry scan found, and those the batch's operations name), so a post or void of
    a hold never depends on when the scan last ran; a transfer on the hold's account that
    does not name it may still see the hold's amount until the next scan.
    """
    s = _Scratch(view, counters, seq, now_ms)
    due = sorted(
        pid
        for pid, p in s.pendings.items()
        if p.resolved_by is None
        and p.transfer.expires_at_ms is not None
        and p.transfer.expires_at_ms <= now_ms
    )
    for pid in due:
        _apply_or_fail(s, ExpirePending(pid))

    results = s.effects.results
    for ops in requests:
        i = 0
        while i < len(ops):
            j = i
            while ops[j].linked and j + 1 < len(ops):
                j += 1
            if j > i or ops[j].linked:
                results.extend(_decide_group(s, ops[i : j + 1]))
            else:
                results.append(_decide_single(s, ops[i]))
            i = j + 1

    e = s.effects
    e.counters = IdCounters(**s.next)
    changed = {entry.account_id for entry in e.entries}
    changed.update(event.account.id for event in e.account_events)
    e.accounts = {aid: s.accounts[aid] for aid in sorted(changed)}
    e.new_account_ids = {ev.account.id for ev in e.account_events if ev.kind == "create"}
    # Holds opened and resolved in this same batch never reach the open-holds table.
    created = {t.id for t in e.transfers if t.kind is TransferKind.PENDING}
    resolved = {t.pending_id for t in e.transfers if t.pending_id is not None}
    e.opened_pendings = {
        t.id: t.expires_at_ms
        for t in e.transfers
        if t.kind is TransferKind.PENDING and t.id not in resolved
    }
    e.closed_pendings = sorted(pid for pid in resolved if pid is not None and pid not in created)
    e.pendings = {pid: s.pendings[pid] for pid in created | resolved if pid is not None}
    e.reversed_by = {k: v for k, v in s.reversed_by.items() if view.reversed_by.get(k) != v}
    e.refunded = {k: v for k, v in s.refunded.items() if view.refunded.get(k) != v}
    e.kinds = dict(s.kinds)  # all it knew (kinds never change): the next view is read afresh
    return e


def overlay(view: LedgerView, effects: BatchEffects) -> None:
    """Lay a decided but not yet committed batch over what was read from the database, so the
    next batch is decided as if it had committed (the writer's pipeline, docs/adr/0001)."""
    view.assets.update((a.code, a) for a in effects.assets)
    for aid, account in effects.accounts.items():
        view.accounts[aid] = account
        view.account_ids_by_natural_key[account.info.natural_key] = aid
    for t in effects.transfers:
        if t.client != LEDGER_CLIENT:
            view.transfers_by_key[(t.client, t.key)] = t
    for f in effects.failures:
        view.failures_by_key[(f.client, f.key)] = f
    view.pendings.update(effects.pendings)
    view.reversed_by.update(effects.reversed_by)
    view.refunded.update(effects.refunded)
    view.kinds.update(effects.kinds)


def _decide_single(s: _Scratch, op: Op) -> Result:
    result = _apply_or_fail(s, op)
    if not result.ok:
        _remember_failure(s, op, result)
    return result


def _decide_group(s: _Scratch, group: Sequence[Op]) -> list[Result]:
    if group[-1].linked:  # the request ended inside a group
        return [Result(ok=False, code="linked_event_chain_open") for _ in group]
    mark = s.begin_group()
    results: list[Result] = []
    for op in group:
        result = _apply_or_fail(s, op)
        results.append(result)
        if not result.ok:
            break
    if results[-1].ok:
        s.end_group(None)
        return results
    s.end_group(mark)
    failed_at = len(results) - 1
    _remember_failure(s, group[failed_at], results[failed_at])
    linked = Result(ok=False, code="linked_event_failed")
    return [results[k] if k == failed_at else linked for k in range(len(group))]


def _remember_failure(s: _Scratch, op: Op, result: Result) -> None:
    if not isinstance(op, CreateTransfer | PostPending | VoidPending | Reverse | Refund):
        return
    if result.code not in codes.PERSISTED_FAILURES:
        return
    failure = Failure(
        client=op.client,
        key=op.key,
        request=canonical_request(op),
        code=result.code,
        field=result.field,
        seq=s.seq,
        created_at_ms=s.now_ms,
    )
    s.effects.failures.append(failure)
    s.failures_by_key[(op.client, op.key)] = failure


def _apply_or_fail(s: _Scratch, op: Op) -> Result:
    try:
        _fits_journal(op)
        return _APPLY[type(op)](s, op)
    except _Failed as failed:
        return Result(ok=False, code=failed.code, field=failed.field)


# What the journal's columns hold (the edge checks a caller's request the same way; an
# in-process caller reaches decide directly, and a value past a column would fail the whole
# batch's statement on PostgreSQL, for every caller in it).
_TEXT_BOUNDS = (
    ("key", limits.KEY_CHARS_MAX),
    ("target_key", limits.KEY_CHARS_MAX),
    ("client", limits.CLIENT_CHARS_MAX),
    ("reason", limits.REASON_CHARS_MAX),
    ("legal_entity", limits.NAME_CHARS_MAX),
    ("owner_kind", limits.NAME_CHARS_MAX),
    ("owner_id", limits.NAME_CHARS_MAX),
    ("purpose", limits.NAME_CHARS_MAX),
    ("asset", limits.ASSET_CODE_CHARS_MAX),
    ("code", limits.ASSET_CODE_CHARS_MAX),
    ("name", limits.NAME_CHARS_MAX),
)


def _fits_journal(op: Op) -> None:
    """Refuse an operation whose text would not fit the journal (not kept: its shape)."""
    for name, most in _TEXT_BOUNDS:
        value = getattr(op, name, None)
        if isinstance(value, str) and len(value) > most:
            raise _Failed("string_too_long", name)
    postings = getattr(op, "postings", None)
    if postings is not None and len(postings) > limits.POSTINGS_PER_TRANSFER_MAX:
        raise _Failed("too_many_postings", "postings")


# --- assets and accounts -------------------------------------------------------------------


def _create_asset(s: _Scratch, op: CreateAsset) -> Result:
    existing = s.assets.get(op.code)
    if existing is not None:
        for name in ("kind", "scale", "name"):
            if getattr(existing, name) != getattr(op, name):
                raise _Failed(f"exists_with_different_{name}", name)
        return Result(ok=True, code=codes.OK, asset=op.code, replayed=True)
    asset = Asset(code=op.code, kind=op.kind, scale=op.scale, name=op.name)
    s.set(s.assets, op.code, asset)
    s.effects.assets.append(asset)
    return Result(ok=True, code=codes.OK, seq=s.seq, asset=op.code)


def _kind_flags(flags: AccountFlags) -> tuple[bool, bool]:
    return flags.no_overdraft, flags.no_overcredit


def _create_account(s: _Scratch, op: CreateAccount) -> Result:
    if op.asset not in s.assets:
        raise _Failed("asset_not_found", "asset")
    nkey = natural_key(op.legal_entity, op.owner_kind, op.owner_id, op.asset, op.purpose)
    existing_id = s.natural.get(nkey)
    if existing_id is not None:
        existing = s.accounts[existing_id]
        if _kind_flags(existing.info.flags) != _kind_flags(op.flags):
            # what the account is; its frozen flags change over time (freeze, thaw): the
            # same account asked for again is the same account, frozen or not
            raise _Failed("exists_with_different_flags", "flags")
        return Result(ok=True, code=codes.OK, account_id=existing_id, replayed=True)
    info = AccountInfo(
        id=s.take_id("account"),
        asset=op.asset,
        legal_entity=op.legal_entity,
        owner_kind=op.owner_kind,
        owner_id=op.owner_id,
        purpose=op.purpose,
        flags=op.flags,
    )
    s.put_account(Account(info=info, balance=Balance()))
    s.set(s.natural, nkey, info.id)
    _account_event(s, "create", info)
    return Result(ok=True, code=codes.OK, seq=s.seq, account_id=info.id)


def _set_account_frozen(s: _Scratch, op: SetAccountFrozen) -> Result:
    account = s.accounts.get(op.account_id)
    if account is None:
        raise _Failed("account_not_found", "account_id")
    flags = account.info.flags
    new_flags = replace(
        flags,
        debit_frozen=flags.debit_frozen if op.debit_frozen is None else op.debit_frozen,
        credit_frozen=flags.credit_frozen if op.credit_frozen is None else op.credit_frozen,
    )
    if new_flags == flags:
        return Result(ok=True, code=codes.OK, account_id=account.id, replayed=True)
    info = replace(account.info, flags=new_flags)
    s.put_account(replace(account, info=info))
    _account_event(s, "flags", info)
    return Result(ok=True, code=codes.OK, seq=s.seq, account_id=account.id)


def _account_event(s: _Scratch, kind: str, info: AccountInfo) -> None:
    event = AccountEvent(id=s.take_id("account_event"), seq=s.seq, kind=kind, account=info)
    s.effects.account_events.append(event)


# --- transfers -----------------------------------------------------------------------------


def _create_transfer(s: _Scratch, op: CreateTransfer) -> Result:
    replay = _replay(s, op)
    if replay is not None:
        return replay
    if op.asset not in s.assets:
        raise _Failed("asset_not_found", "asset")
    _check_postings_shape(op.postings)
    accounts = []
    for i, posting in enumerate(op.postings):
        account = s.accounts.get(posting.account_id)
        where = f"postings[{i}].account_id"
        if account is None:
            raise _Failed("account_not_found", where)
        if account.info.asset != op.asset:
            raise _Failed("account_asset_mismatch", where)
        flags = account.info.flags
        if posting.side is Side.DEBIT and flags.debit_frozen:
            raise _Failed("debit_account_frozen", where)
        if posting.side is Side.CREDIT and flags.credit_frozen:
            raise _Failed("credit_account_frozen", where)
        accounts.append(account)
    kind = TransferKind.PENDING if op.pending else TransferKind.POSTED
    timeout_s = op.timeout_s if op.pending else None
    moves = [
        (account, p.side, 0, p.amount) if op.pending else (account, p.side, p.amount, 0)
        for account, p in zip(accounts, op.postings, strict=True)
    ]
    transfer = Transfer(
        id=s.next["transfer"],
        client=op.client,
        key=op.key,
        kind=kind,
        asset=op.asset,
        postings=op.postings,
        pending_id=None,
        timeout_s=timeout_s,
        expires_at_ms=None if timeout_s is None else s.now_ms + timeout_s * 1000,
        reason=op.reason,
        metadata=op.metadata,
        seq=s.seq,
        created_at_ms=s.now_ms,
    )
    return _commit_transfer(s, transfer, moves)


def _resolve_pending(s: _Scratch, op: PostPending | VoidPending | ExpirePending) -> Result:
    if not isinstance(op, ExpirePending):
        replay = _replay(s, op)
        if replay is not None:
            return replay
    held = s.pendings.get(op.pending_id)
    if held is None:
        raise _Failed("pending_transfer_not_found", "pending_id")
    pending = held.transfer
    if pending.kind is not TransferKind.PENDING:
        raise _Failed("pending_transfer_not_pending", "pending_id")
    if held.resolved_by is not None:
        raise _Failed(_ALREADY[held.resolved_by], "pending_id")

    posted = [0] * len(pending.postings)
    if isinstance(op, PostPending):
        posted = [p.amount for p in pending.postings]
        if op.amount is not None:
            posted = [_partial_amount(pending, op.amount)] * len(pending.postings)
    moves = []
    for p, amount in zip(pending.postings, posted, strict=True):
        account = s.accounts.get(p.account_id)
        if account is None:  # a hold's accounts exist: the writer reads them with the hold
            raise AssertionError(f"account {p.account_id} of hold {pending.id} not loaded")
        moves.append((account, p.side, amount, -p.amount))

    if isinstance(op, ExpirePending):
        client, key, kind = LEDGER_CLIENT, f"expire:{pending.id}", TransferKind.EXPIRE
        reason, metadata = "expired", pending.metadata
    else:
        client, key, reason, metadata = op.client, op.key, op.reason, op.metadata
        kind = TransferKind.POST if isinstance(op, PostPending) else TransferKind.VOID
    recorded = tuple(
        Posting(p.account_id, p.side, amount if kind is TransferKind.POST else p.amount)
        for p, amount in zip(pending.postings, posted, strict=True)
    )
    transfer = Transfer(
        id=s.next["transfer"],
        client=client,
        key=key,
        kind=kind,
        asset=pending.asset,
        postings=recorded,
        pending_id=pending.id,
        timeout_s=None,
        expires_at_ms=None,
        reason=reason,
        metadata=metadata,
        seq=s.seq,
        created_at_ms=s.now_ms,
    )
    return _commit_transfer(s, transfer, moves)


_ALREADY = {
    TransferKind.POST: "pending_transfer_already_posted",
    TransferKind.VOID: "pending_transfer_already_voided",
    TransferKind.EXPIRE: "pending_transfer_expired",
}


def _partial_amount(pending: Transfer, amount: int) -> int:
    legs = {p.amount for p in pending.postings}
    if amount <= 0:
        raise _Failed("amount_must_be_positive", "amount")
    if len(legs) != 1:
        raise _Failed("partial_post_not_uniform", "amount")
    if amount > next(iter(legs)):
        raise _Failed("exceeds_pending_amount", "amount")
    return amount


def _check_postings_shape(postings: Sequence[Posting]) -> None:
    """The edge validates these too; the domain is the authority and checks again."""
    seen: set[int] = set()
    debits = credits = 0
    for i, p in enumerate(postings):
        if p.amount <= 0 or p.amount > limits.AMOUNT_MAX:
            raise _Failed("amount_must_be_positive", f"postings[{i}].amount")
        if p.account_id in seen:
            raise _Failed("accounts_must_be_different", f"postings[{i}].account_id")
        seen.add(p.account_id)
        if p.side is Side.DEBIT:
            debits += p.amount
        else:
            credits += p.amount
    if len(postings) < 2 or debits != credits:
        raise _Failed("postings_unbalanced", "postings")


Move = tuple[Account, Side, int, int]  # account, side, posted delta, pending delta


def _commit_transfer(s: _Scratch, transfer: Transfer, moves: list[Move]) -> Result:
    """Check every moved account's bounds; only then take ids and change state."""
    after: list[Balance] = []
    for i, (account, side, posted_delta, pending_delta) in enumerate(moves):
        balance = _moved(account.balance, side, posted_delta, pending_delta)
        _check_bounds(account.info.flags, balance, f"postings[{i}].account_id")
        after.append(balance)
    taken = s.take_id("transfer")
    assert taken == transfer.id, "a transfer is built with the id it will take"
    entries = []
    for (account, side, posted_delta, pending_delta), balance in zip(moves, after, strict=True):
        s.put_account(Account(account.info, balance))
        entries.append(
            Entry(
                id=s.take_id("entry"),
                seq=s.seq,
                transfer_id=transfer.id,
                account_id=account.id,
                side=side,
                posted_delta=posted_delta,
                pending_delta=pending_delta,
                balance=balance,
            )
        )
    s.add_transfer(transfer, entries)
    return Result(
        ok=True,
        code=codes.OK,
        seq=s.seq,
        transfer_id=transfer.id,
        asset=transfer.asset,
        balances={e.account_id: e.balance for e in entries},
    )


def _moved(b: Balance, side: Side, posted_delta: int, pending_delta: int) -> Balance:
    if side is Side.DEBIT:
        return Balance(
            b.debits_posted + posted_delta,
            b.credits_posted,
            b.debits_pending + pending_delta,
            b.credits_pending,
            b.version + 1,
        )
    return Balance(
        b.debits_posted,
        b.credits_posted + posted_delta,
        b.debits_pending,
        b.credits_pending + pending_delta,
        b.version + 1,
    )


def _check_bounds(flags: AccountFlags, b: Balance, where: str) -> None:
    fields = (b.debits_posted, b.credits_posted, b.debits_pending, b.credits_pending)
    assert min(fields) >= 0, f"negative balance field at {where}: {b}"
    if max(fields) > limits.BALANCE_MAX or b.version > limits.BALANCE_MAX:
        raise _Failed("overflows_balance", where)
    if b.debits_posted + b.debits_pending > limits.BALANCE_MAX:
        raise _Failed("overflows_balance", where)
    if b.credits_posted + b.credits_pending > limits.BALANCE_MAX:
        raise _Failed("overflows_balance", where)
    if flags.no_overdraft and b.debits_posted + b.debits_pending > b.credits_posted:
        raise _Failed("exceeds_credits", where)
    if flags.no_overcredit and b.credits_posted + b.credits_pending > b.debits_posted:
        raise _Failed("exceeds_debits", where)


# --- reversals and refunds -----------------------------------------------------------------


def _reverse(s: _Scratch, op: Reverse) -> Result:
    replay = _replay(s, op)
    if replay is not None:
        return replay
    if op.target_key == op.key:  # the edge refuses it too; its tombstone would be its own key
        raise _Failed("target_not_reversible", "target_key")
    target = s.transfers_by_key.get((op.client, op.target_key))
    if target is None:
        failed = s.failures_by_key.get((op.client, op.target_key))
        if not op.tombstone:
            raise _Failed("target_failed" if failed else "target_not_found", "target_key")
        if failed is None:  # the original has not arrived: it never will be applied
            tombstone = Failure(
                client=op.client,
                key=op.target_key,
                request={"op": "tombstone", "reversed_by": op.key},
                code=TOMBSTONE_CODE,
                field=None,
                seq=s.seq,
                created_at_ms=s.now_ms,
            )
            s.effects.failures.append(tombstone)
            s.set(s.failures_by_key, (op.client, op.target_key), tombstone)
            return _no_effect(s, op, None)
        return _no_effect(s, op, None)  # the target failed: nothing was applied to undo
    if target.kind not in REVERSIBLE or not _chain_allows_reverse(s, target):
        raise _Failed("target_not_reversible", "target_key")
    done = s.reversed_by.get(target.id)
    if done is not None:
        if op.tombstone:  # a terminal's reversal after a void: nothing more to undo
            return _no_effect(s, op, done)
        raise _Failed("target_already_reversed", "target_key")
    if op.whole and s.refunded.get(target.id, 0):
        raise _Failed("target_partly_refunded", "target_key")
    amount = _leg_amount(target) - s.refunded.get(target.id, 0)
    if amount == 0:
        if op.tombstone:
            return _no_effect(s, op, None)
        raise _Failed("target_already_refunded", "target_key")
    result = _give_back(s, op, target, TransferKind.REVERSE, amount)
    s.set(s.reversed_by, target.id, result.transfer_id)
    if target.kind is TransferKind.REFUND and target.target_id is not None:
        origin = target.target_id
        s.set(s.refunded, origin, s.refunded.get(origin, 0) - _leg_amount(target))
    return result


def _chain_allows_reverse(s: _Scratch, target: Transfer) -> bool:
    """Two chains stay closed, or refunds could give back more than was taken: a reversal
    of a refund is final (reversing it would refund again without counting it), and a refund
    of a reversed original cannot be taken back (the original's rest is already returned)."""
    if target.target_id is None:
        return True
    if target.kind is TransferKind.REVERSE:
        inner = _kind_of(s, target.target_id)  # unknown: refused, never let through
        return inner is not None and inner is not TransferKind.REFUND
    if target.kind is TransferKind.REFUND:
        return target.target_id not in s.reversed_by
    return True


def _kind_of(s: _Scratch, transfer_id: int) -> TransferKind | None:
    kind = s.kinds.get(transfer_id)
    if kind is not None:
        return kind
    for t in s.transfers_by_key.values():  # made earlier in this batch: a rare path
        if t.id == transfer_id:
            return t.kind
    return None


def _no_effect(s: _Scratch, op: Reverse, transfer_id: int | None) -> Result:
    record = Failure(
        client=op.client,
        key=op.key,
        request=canonical_request(op),
        code=NO_EFFECT_CODE,
        field=None,
        seq=s.seq,
        created_at_ms=s.now_ms,
    )
    s.effects.failures.append(record)
    s.set(s.failures_by_key, (op.client, op.key), record)
    return Result(ok=True, code=codes.OK, seq=s.seq, transfer_id=transfer_id)


def _refund(s: _Scratch, op: Refund) -> Result:
    replay = _replay(s, op)
    if replay is not None:
        return replay
    if op.amount <= 0 or op.amount > limits.AMOUNT_MAX:
        raise _Failed("amount_must_be_positive", "amount")
    target = s.transfers_by_key.get((op.client, op.target_key))
    if target is None:
        failed = s.failures_by_key.get((op.client, op.target_key))
        raise _Failed("target_failed" if failed else "target_not_found", "target_key")
    if target.kind not in _REFUNDABLE:
        raise _Failed("target_not_reversible", "target_key")
    if target.id in s.reversed_by:
        raise _Failed("target_already_reversed", "target_key")
    refunded = s.refunded.get(target.id, 0)
    if op.amount > _leg_amount(target) - refunded:
        raise _Failed("exceeds_refundable_amount", "amount")
    result = _give_back(s, op, target, TransferKind.REFUND, op.amount)
    s.set(s.refunded, target.id, refunded + op.amount)
    return result


def _leg_amount(t: Transfer) -> int:
    """Reversals and refunds move every leg by one amount: the target's legs must agree."""
    legs = {p.amount for p in t.postings}
    if len(legs) != 1:
        raise _Failed("target_not_uniform", "target_key")
    return next(iter(legs))


def _give_back(
    s: _Scratch, op: Reverse | Refund, target: Transfer, kind: TransferKind, amount: int
) -> Result:
    """A posted transfer of `amount` on every leg of `target`, sides swapped. Frozen flags do
    not stop it (it undoes what they allowed); balance floors still do."""
    postings = tuple(
        Posting(p.account_id, Side.CREDIT if p.side is Side.DEBIT else Side.DEBIT, amount)
        for p in target.postings
    )
    s.set(s.kinds, target.id, target.kind)  # what a later batch's chain check reads
    moves = []
    for p in postings:
        account = s.accounts.get(p.account_id)
        if account is None:  # a target's accounts exist: the writer reads them with it
            raise AssertionError(f"account {p.account_id} of transfer {target.id} not loaded")
        moves.append((account, p.side, amount, 0))
    transfer = Transfer(
        id=s.next["transfer"],
        client=op.client,
        key=op.key,
        kind=kind,
        asset=target.asset,
        postings=postings,
        pending_id=None,
        timeout_s=None,
        expires_at_ms=None,
        reason=op.reason,
        metadata=op.metadata,
        seq=s.seq,
        created_at_ms=s.now_ms,
        target_id=target.id,
    )
    return _commit_transfer(s, transfer, moves)


# --- idempotency ---------------------------------------------------------------------------


def canonical_request(op: KeyedOp) -> dict[str, object]:
    """The fields that make two requests under one key the same request (JSON-shaped)."""
    meta = [list(pair) for pair in op.metadata]
    if isinstance(op, CreateTransfer):
        return {
            "op": "transfer",
            "asset": op.asset,
            "postings": [[p.account_id, str(p.side), p.amount] for p in op.postings],
            "pending": op.pending,
            "timeout_s": op.timeout_s if op.pending else None,
            "reason": op.reason,
            "metadata": meta,
        }
    if isinstance(op, PostPending):
        return {
            "op": "post_pending",
            "pending_id": op.pending_id,
            "amount": op.amount,
            "reason": op.reason,
            "metadata": meta,
        }
    if isinstance(op, Reverse):
        return {"op": "reverse", "target_key": op.target_key, "reason": op.reason, "metadata": meta}
    if isinstance(op, Refund):
        return {
            "op": "refund",
            "target_key": op.target_key,
            "amount": op.amount,
            "reason": op.reason,
            "metadata": meta,
        }
    return {
        "op": "void_pending",
        "pending_id": op.pending_id,
        "reason": op.reason,
        "metadata": meta,
    }


def canonical_of_transfer(t: Transfer, pendings: Mapping[int, PendingState]) -> dict[str, object]:
    """The canonical request that produced stored transfer `t`."""
    meta = [list(pair) for pair in t.metadata]
    if t.kind in (TransferKind.POSTED, TransferKind.PENDING):
        return canonical_request(
            CreateTransfer(
                client=t.client,
                key=t.key,
                asset=t.asset,
                postings=t.postings,
                pending=t.kind is TransferKind.PENDING,
                timeout_s=t.timeout_s,
                reason=t.reason,
                metadata=t.metadata,
            )
        )
    assert t.pending_id is not None
    if t.kind is TransferKind.POST:
        held = pendings.get(t.pending_id)
        amount: int | None = t.postings[0].amount
        if held is not None and all(
            p.amount == q.amount for p, q in zip(t.postings, held.transfer.postings, strict=True)
        ):
            amount = None  # posted in full: equal to a request without an amount
        return {
            "op": "post_pending",
            "pending_id": t.pending_id,
            "amount": amount,
            "reason": t.reason,
            "metadata": meta,
        }
    return {"op": "void_pending", "pending_id": t.pending_id, "reason": t.reason, "metadata": meta}


def _canonical_of_give_back(s: _Scratch, t: Transfer, op: KeyedOp) -> dict[str, object]:
    """The request that made reverse or refund `t`. Its target is stored by id; it matches
    the asked `target_key` when that key names the same transfer."""
    target_key = f"#{t.target_id}"
    if isinstance(op, Reverse | Refund):
        named = s.transfers_by_key.get((op.client, op.target_key))
        if named is not None and named.id == t.target_id:
            target_key = op.target_key
    request: dict[str, object] = {
        "op": str(t.kind),
        "target_key": target_key,
        "reason": t.reason,
        "metadata": [list(pair) for pair in t.metadata],
    }
    if t.kind is TransferKind.REFUND:
        request["amount"] = t.postings[0].amount
    return request


def _compare_post_amount(request: dict[str, object], pendings: Mapping[int, PendingState]) -> None:
    """A full post may be asked with or without its amount: both mean the same request."""
    if request.get("op") != "post_pending" or request.get("amount") is None:
        return
    pid = request["pending_id"]
    held = pendings.get(pid) if isinstance(pid, int) else None
    if held is not None and all(p.amount == request["amount"] for p in held.transfer.postings):
        request["amount"] = None


def _first_difference(a: Mapping[str, object], b: Mapping[str, object]) -> str | None:
    for name in REQUEST_FIELDS:
        if a.get(name) != b.get(name):
            return name
    return None


def _replay(s: _Scratch, op: KeyedOp) -> Result | None:
    """The answer for a key seen before, or None for a new key."""
    ikey = (op.client, op.key)
    first = s.transfers_by_key.get(ikey)
    if first is not None:
        request = canonical_request(op)
        _compare_post_amount(request, s.pendings)
        if first.kind in (TransferKind.REVERSE, TransferKind.REFUND):
            stored = _canonical_of_give_back(s, first, op)
        else:
            stored = canonical_of_transfer(first, s.pendings)
        differs = _first_difference(request, stored)
        if differs is not None:
            raise _Failed(f"exists_with_different_{differs}", differs)
        return Result(
            ok=True,
            code=codes.OK,
            seq=first.seq,
            transfer_id=first.id,
            asset=first.asset,
            replayed=True,
        )
    failed = s.failures_by_key.get(ikey)
    if failed is not None and failed.code == TOMBSTONE_CODE:  # reversed before it arrived
        return Result(
            ok=False,
            code="id_already_failed",
            seq=failed.seq,
            original_code=TOMBSTONE_CODE,
            replayed=True,
        )
    if failed is not None and failed.code == NO_EFFECT_CODE:  # a reverse that undid nothing
        differs = _first_difference(canonical_request(op), failed.request)
        if differs is not None:
            raise _Failed(f"exists_with_different_{differs}", differs)
        return Result(ok=True, code=codes.OK, seq=failed.seq, replayed=True)
    if failed is not None:
        request, stored = canonical_request(op), dict(failed.request)
        _compare_post_amount(request, s.pendings)
        _compare_post_amount(stored, s.pendings)
        differs = _first_difference(request, stored)
        if differs is not None:
            raise _Failed(f"exists_with_different_{differs}", differs)
        return Result(
            ok=False,
            code="id_already_failed",
            seq=failed.seq,
            field=failed.field,
            original_code=failed.code,
            replayed=True,
        )
    return None


_APPLY: dict[type, Callable[[_Scratch, Any], Result]] = {
    CreateAsset: _create_asset,
    CreateAccount: _create_account,
    SetAccountFrozen: _set_account_frozen,
    CreateTransfer: _create_transfer,
    PostPending: _resolve_pending,
    VoidPending: _resolve_pending,
    ExpirePending: _resolve_pending,
    Reverse: _reverse,
    Refund: _refund,
}
