"""The journal's rows, the batch hash chain, and the verification of both. Pure.

A committed batch is: its sequence number, its commit time, and the rows it appended to the
append-only tables (assets, account events, transfers, entries, failures). The rows are plain
dicts keyed by column name; they are what the writer inserts, what
`GET /internal/v1/journal` serves and what `cardcore ledger verify` reads back, so all three
hash the very same values.

    hash(batch) = SHA-256(prev_hash || canonical JSON of [seq, committed_at_ms, tables...])
"""

from __future__ import annotations

import bisect
import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from cardcore.ledger.decide import REVERSIBLE, BatchEffects
from cardcore.ledger.model import (
    Account,
    AccountEvent,
    AccountFlags,
    AccountInfo,
    Asset,
    AssetKind,
    Balance,
    Failure,
    Metadata,
    Posting,
    Side,
    Transfer,
    TransferKind,
)

Row = dict[str, Any]


class RowLike(Protocol):
    """A row read back from the database: a dict or SQLAlchemy's RowMapping."""

    def __getitem__(self, name: str, /) -> Any: ...


GENESIS_HASH = "0" * 64

# Column order of each journal table: the order values are hashed in.
COLUMNS: dict[str, tuple[str, ...]] = {
    "assets": ("code", "kind", "scale", "name", "seq"),
    "account_events": (
        "id",
        "seq",
        "kind",
        "account_id",
        "asset",
        "legal_entity",
        "owner_kind",
        "owner_id",
        "purpose",
        "no_overdraft",
        "no_overcredit",
        "debit_frozen",
        "credit_frozen",
    ),
    "transfers": (
        "id",
        "client",
        "key",
        "kind",
        "asset",
        "postings",
        "pending_id",
        "timeout_s",
        "expires_at_ms",
        "reason",
        "metadata",
        "seq",
        "created_at_ms",
        "target_id",
    ),
    "entries": (
        "id",
        "seq",
        "transfer_id",
        "account_id",
        "side",
        "posted_delta",
        "pending_delta",
        "debits_posted",
        "credits_posted",
        "debits_pending",
        "credits_pending",
        "version",
    ),
    "failures": ("client", "key", "request", "code", "field", "seq", "created_at_ms"),
}
TABLES = tuple(COLUMNS)


# One encoder for every canonical text (json.dumps with these options builds a new one per
# call: a third of the cost of a transfer's two texts).
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def canonical_json(value: object) -> str:
    return _CANONICAL.encode(value)


# --- model -> records (tuples in column order) ----------------------------------------------

Record = tuple[Any, ...]


def postings_json(postings: Iterable[Posting]) -> str:
    """`canonical_json([[account_id, side, amount], ...])`, formatted directly: ids and
    amounts are ints and a side is "debit" or "credit", so the text is the same (a unit test
    holds the two equal) at a quarter of the cost."""
    return "[" + ",".join([f'[{p.account_id:d},"{p.side}",{p.amount:d}]' for p in postings]) + "]"


def metadata_json(metadata: Metadata) -> str:
    return canonical_json(dict(metadata)) if metadata else "{}"


def flags_record(flags: AccountFlags) -> Record:
    return (flags.no_overdraft, flags.no_overcredit, flags.debit_frozen, flags.credit_frozen)


def balance_record(b: Balance) -> Record:
    return (b.debits_posted, b.credits_posted, b.debits_pending, b.credits_pending, b.version)


def _account_event_record(e: AccountEvent) -> Record:
    info = e.account
    return (
        e.id,
        e.seq,
        e.kind,
        info.id,
        info.asset,
        info.legal_entity,
        info.owner_kind,
        info.owner_id,
        info.purpose,
        *flags_record(info.flags),
    )


def _transfer_record(t: Transfer) -> Record:
    return (
        t.id,
        t.client,
        t.key,
        str(t.kind),
        t.asset,
        postings_json(t.postings),
        t.pending_id,
        t.timeout_s,
        t.expires_at_ms,
        t.reason,
        metadata_json(t.metadata),
        t.seq,
        t.created_at_ms,
        t.target_id,
    )


def _failure_record(f: Failure) -> Record:
    request = canonical_json(f.request)
    return (f.client, f.key, request, f.code, f.field, f.seq, f.created_at_ms)


def batch_records(effects: BatchEffects) -> dict[str, list[Record]]:
    """The rows a batch appends, per journal table, each a tuple in `COLUMNS` order."""
    return {
        # Assets and failures have no id: they are hashed in the order they are read back.
        "assets": sorted(
            (a.code, str(a.kind), a.scale, a.name, effects.seq) for a in effects.assets
        ),
        "account_events": [_account_event_record(e) for e in effects.account_events],
        "transfers": [_transfer_record(t) for t in effects.transfers],
        "entries": [
            (
                e.id,
                e.seq,
                e.transfer_id,
                e.account_id,
                str(e.side),
                e.posted_delta,
                e.pending_delta,
                *balance_record(e.balance),
            )
            for e in effects.entries
        ],
        "failures": sorted(_failure_record(f) for f in effects.failures),
    }


def records_of(rows: Mapping[str, Iterable[Mapping[str, Any]]]) -> dict[str, list[Record]]:
    """Rows read back as dicts (the API, the verifier) -> records in `COLUMNS` order."""
    return {
        table: [tuple(row[c] for c in COLUMNS[table]) for row in rows.get(table, ())]
        for table in TABLES
    }


def batch_hash(
    prev_hash: str, seq: int, committed_at_ms: int, records: Mapping[str, list[Record]]
) -> str:
    document: list[object] = [seq, committed_at_ms]
    document.extend(records.get(table, []) for table in TABLES if table != "transfers")
    # A transfer's target_id (migration 0002) is hashed only when it is set, so batches
    # written before it existed verify unchanged.
    transfers = [r[:-1] if r[-1] is None else r for r in records.get("transfers", [])]
    document.insert(2 + TABLES.index("transfers"), transfers)
    payload = json.dumps(document, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(prev_hash.encode("ascii") + payload.encode("utf-8")).hexdigest()


# --- rows -> model -------------------------------------------------------------------------


def asset_from_row(r: RowLike) -> Asset:
    return Asset(code=r["code"], kind=AssetKind(r["kind"]), scale=r["scale"], name=r["name"])


def flags_from_row(r: RowLike) -> AccountFlags:
    return AccountFlags(
        no_overdraft=bool(r["no_overdraft"]),
        no_overcredit=bool(r["no_overcredit"]),
        debit_frozen=bool(r["debit_frozen"]),
        credit_frozen=bool(r["credit_frozen"]),
    )


# The columns `account_from_record` reads, in its order (ledger_accounts has more).
ACCOUNT_COLUMNS = (
    "id",
    "asset",
    "legal_entity",
    "owner_kind",
    "owner_id",
    "purpose",
    "no_overdraft",
    "no_overcredit",
    "debit_frozen",
    "credit_frozen",
    "debits_posted",
    "credits_posted",
    "debits_pending",
    "credits_pending",
    "version",
)


def account_from_record(r: tuple[Any, ...]) -> Account:
    """An account from the values of `ACCOUNT_COLUMNS`, in order (the writer's fast path)."""
    flags = AccountFlags(bool(r[6]), bool(r[7]), bool(r[8]), bool(r[9]))
    info = AccountInfo(r[0], r[1], r[2], r[3], r[4], r[5], flags)
    return Account(info, Balance(r[10], r[11], r[12], r[13], r[14]))


def account_from_row(r: RowLike) -> Account:
    return account_from_record(tuple(r[c] for c in ACCOUNT_COLUMNS))


def postings_from_json(text: str) -> tuple[Posting, ...]:
    return tuple(Posting(int(a), Side(side), int(amount)) for a, side, amount in json.loads(text))


def metadata_from_json(text: str) -> Metadata:
    return tuple(sorted(json.loads(text).items()))


def transfer_from_row(r: RowLike) -> Transfer:
    return Transfer(
        id=r["id"],
        client=r["client"],
        key=r["key"],
        kind=TransferKind(r["kind"]),
        asset=r["asset"],
        postings=postings_from_json(r["postings"]),
        pending_id=r["pending_id"],
        timeout_s=r["timeout_s"],
        expires_at_ms=r["expires_at_ms"],
        reason=r["reason"],
        metadata=metadata_from_json(r["metadata"]),
        seq=r["seq"],
        created_at_ms=r["created_at_ms"],
        target_id=r["target_id"],
    )


def failure_from_row(r: RowLike) -> Failure:
    return Failure(
        client=r["client"],
        key=r["key"],
        request=json.loads(r["request"]),
        code=r["code"],
        field=r["field"],
        seq=r["seq"],
        created_at_ms=r["created_at_ms"],
    )


# --- verification --------------------------------------------------------------------------


class Mismatch(Exception):
    """The first place where the stored journal disagrees with itself or the balances."""


@dataclass(slots=True)
class Verifier:
    """Replays committed batches in order; raises `Mismatch` at the first inconsistency."""

    prev_hash: str = GENESIS_HASH
    last_seq: int = 0
    # Memory is bounded by the accounts and the open holds, never by the history: per
    # account its balance and what it is (`infos`, their repeated texts and flags shared),
    # the unresolved holds, and the give-backs of one family at a time (`given_back`).
    balances: dict[int, Balance] = field(default_factory=dict)
    infos: dict[int, AccountInfo] = field(default_factory=dict)
    batches: int = 0
    entries: int = 0
    given_backs: int = 0  # reversals and refunds checked
    # Holds not yet resolved (id -> (postings, expires_at_ms)): bounded by what is open.
    holds: dict[int, tuple[tuple[Posting, ...], int | None]] = field(default_factory=dict)
    # The family whose give-backs are being checked (its root: the payment, or whatever
    # transfer the chain of targets ends at) and what `given_back` knows of it: what refunds
    # took of each payment; each reversal's target, amount and (of a payment) the payment's
    # leg; the transfers whose effect is undone now; the reversals of refunds (final: never
    # reversed) and every transfer ever reversed (a refund of one can no longer be
    # reversed): the two chain rules of `decide`. Forgotten when the next family starts.
    family: int | None = None
    refunded: dict[int, int] = field(default_factory=dict)
    reversal_of: dict[int, int] = field(default_factory=dict)
    reversal_amount: dict[int, int] = field(default_factory=dict)
    reversal_leg: dict[int, int] = field(default_factory=dict)
    undone: set[int] = field(default_factory=set)
    reverses_refund: set[int] = field(default_factory=set)
    ever_reversed: set[int] = field(default_factory=set)
    # The texts (asset, legal entity, owner kind, purpose) and flags accounts repeat, kept
    # once: a million accounts of one legal entity hold one copy of its name.
    _shared: dict[object, Any] = field(default_factory=dict)
    # `account`: the journal's account ids in order, and which of them the table had.
    _order: list[int] = field(default_factory=list)
    _stored: bytearray = field(default_factory=bytearray)

    def batch(self, header: Mapping[str, Any], rows: Mapping[str, list[Row]]) -> None:
        seq = header["seq"]
        if seq != self.last_seq + 1:
            raise Mismatch(f"batch {seq}: sequence gap after {self.last_seq}")
        if header["prev_hash"] != self.prev_hash:
            raise Mismatch(f"batch {seq}: prev_hash does not link to batch {self.last_seq}")
        expected = batch_hash(self.prev_hash, seq, header["committed_at_ms"], records_of(rows))
        if header["hash"] != expected:
            raise Mismatch(f"batch {seq}: hash {header['hash']} but its rows hash to {expected}")
        for event in rows.get("account_events", ()):
            self._account_event(seq, event)
        self._transfers(seq, rows.get("transfers", ()), rows.get("entries", ()))
        self.prev_hash = header["hash"]
        self.last_seq = seq
        self.batches += 1

    def _share(self, value: Any) -> Any:
        return self._shared.setdefault(value, value)

    def _account_event(self, seq: int, event: Row) -> None:
        share = self._share
        info = AccountInfo(
            event["account_id"],
            share(event["asset"]),
            share(event["legal_entity"]),
            share(event["owner_kind"]),
            event["owner_id"],
            share(event["purpose"]),
            share(flags_from_row(event)),
        )
        before = self.infos.get(info.id)
        if event["kind"] == "create":
            if before is not None:
                raise Mismatch(f"batch {seq}: account {info.id} created twice")
            self.balances[info.id] = Balance()
        elif before is None:
            raise Mismatch(f"batch {seq}: flags of unknown account {info.id}")
        elif before.natural_key != info.natural_key or before.asset != info.asset:
            raise Mismatch(f"batch {seq}: account {info.id} changed owner or asset")
        self.infos[info.id] = info

    def _transfers(self, seq: int, transfers: Iterable[Row], entries: Iterable[Row]) -> None:
        transfers = list(transfers)
        sums: dict[int, list[int]] = {}  # transfer -> [debit posted, credit posted, dp, cp]
        asset_of = {t["id"]: t["asset"] for t in transfers}
        legs: dict[int, Counter[tuple[int, str, int, int]]] = {}  # what the entries moved
        for e in entries:
            legs.setdefault(e["transfer_id"], Counter())[
                (e["account_id"], e["side"], e["posted_delta"], e["pending_delta"])
            ] += 1
        for t in transfers:
            self._legs_match(seq, t, legs.get(t["id"], Counter()))
            self._chain(seq, t, legs.get(t["id"], Counter()))
        for e in entries:
            aid, tid = e["account_id"], e["transfer_id"]
            where = f"batch {seq} entry {e['id']} (account {aid}, transfer {tid})"
            if aid not in self.balances:
                raise Mismatch(f"{where}: unknown account")
            if tid not in asset_of:
                raise Mismatch(f"{where}: transfer not in this batch")
            if self.infos[aid].asset != asset_of[tid]:
                raise Mismatch(f"{where}: account asset differs from the transfer's")
            b = self.balances[aid]
            debit = e["side"] == str(Side.DEBIT)
            if debit:
                b = Balance(
                    b.debits_posted + e["posted_delta"],
                    b.credits_posted,
                    b.debits_pending + e["pending_delta"],
                    b.credits_pending,
                    b.version + 1,
                )
            else:
                b = Balance(
                    b.debits_posted,
                    b.credits_posted + e["posted_delta"],
                    b.debits_pending,
                    b.credits_pending + e["pending_delta"],
                    b.version + 1,
                )
            stored = Balance(
                e["debits_posted"],
                e["credits_posted"],
                e["debits_pending"],
                e["credits_pending"],
                e["version"],
            )
            if stored != b:
                raise Mismatch(f"{where}: balance after is {stored}, replay gives {b}")
            _check_floors(self.infos[aid].flags, b, where)
            self.balances[aid] = b
            s = sums.setdefault(tid, [0, 0, 0, 0])
            offset = 0 if debit else 1
            s[offset] += e["posted_delta"]
            s[2 + offset] += e["pending_delta"]
            self.entries += 1
        for tid, (dp, cp, dpen, cpen) in sums.items():
            if dp != cp or dpen != cpen:
                raise Mismatch(f"batch {seq} transfer {tid}: debits and credits differ")

    @staticmethod
    def _legs_match(seq: int, t: Row, moved: Counter[tuple[int, str, int, int]]) -> None:
        """A transfer that moves its own postings (posted, a hold, a reversal or a refund)
        has an entry for each, no more: its postings as stored cannot say other amounts
        than its entries moved (a refund's bound is read from them). Posts, voids and
        expiries move their hold's legs, checked by the balances."""
        kind = TransferKind(t["kind"])
        if kind in (TransferKind.POST, TransferKind.VOID, TransferKind.EXPIRE):
            return
        held = kind is TransferKind.PENDING
        wanted = Counter(
            (p.account_id, str(p.side), 0 if held else p.amount, p.amount if held else 0)
            for p in postings_from_json(t["postings"])
        )
        if wanted != moved:
            raise Mismatch(f"batch {seq} transfer {t['id']}: its postings are not its entries")

    def _chain(self, seq: int, t: Row, moved: Counter[tuple[int, str, int, int]]) -> None:
        """What a transfer may do given the ones before it: a post, void or expiry resolves
        an open hold once and moves exactly its legs (released in full; posted: each leg's
        one amount, at most the hold's, none for a void or expiry). Reversals and refunds
        are checked against their targets afterwards (`given_back`, streamed by id)."""
        kind, tid = TransferKind(t["kind"]), int(t["id"])
        where = f"batch {seq} transfer {tid}"
        postings = postings_from_json(t["postings"])
        if kind is TransferKind.PENDING:
            self.holds[tid] = (postings, t["expires_at_ms"])
        elif kind in (TransferKind.POST, TransferKind.VOID, TransferKind.EXPIRE):
            hold = self.holds.pop(int(t["pending_id"] or 0), None)
            if hold is None:
                raise Mismatch(f"{where}: resolves no open hold ({t['pending_id']})")
            whole = Counter((p.account_id, str(p.side), p.amount, -p.amount) for p in hold[0])
            if kind is TransferKind.POST and moved == whole:
                return  # a full post: each leg its own amount (the legs may differ)
            posted = {amount for (_a, _s, amount, _p) in moved}
            if kind is not TransferKind.POST and posted != {0}:
                raise Mismatch(f"{where}: a {kind} posts money")
            if len(posted) != 1:
                raise Mismatch(f"{where}: its legs post different amounts")
            amount = posted.pop()  # a partial post (equal legs), a void or an expiry
            wanted = Counter((p.account_id, str(p.side), amount, -p.amount) for p in hold[0])
            if wanted != moved or any(amount > p.amount for p in hold[0]):
                raise Mismatch(f"{where}: does not move its hold's legs")

    def _reversible(self, where: str, origin: int, kind: TransferKind, inner: int | None) -> None:
        """What `decide` lets a reversal undo: a payment (posted, or a hold's post), a refund
        or a reversal; never a hold, a void or an expiry; never a reversal of a refund
        (final), nor a refund of a transfer reversed before (its rest went back already)."""
        if kind not in REVERSIBLE:
            raise Mismatch(f"{where}: reverses transfer {origin}, a {kind}, which no reversal may")
        if kind is TransferKind.REVERSE and origin in self.reverses_refund:
            raise Mismatch(f"{where}: reverses transfer {origin}, the final reversal of a refund")
        if kind is TransferKind.REFUND and int(inner or 0) in self.ever_reversed:
            raise Mismatch(f"{where}: reverses refund {origin} of a transfer reversed before")

    def _enter_family(self, root: int) -> None:
        """Start the give-backs of family `root` (forgetting the last one's), or go on."""
        if root == self.family:
            return
        if self.family is not None and root < self.family:
            raise ValueError(f"give-backs of family {root} after family {self.family}")
        self.family = root
        for known in (self.refunded, self.reversal_of, self.reversal_amount, self.reversal_leg,
                      self.undone, self.reverses_refund, self.ever_reversed):  # fmt: skip
            known.clear()

    def given_back(self, t: Row) -> None:
        """One reversal or refund with its target (`target_kind`, `target_target_id`,
        `target_postings`) and its family's `root`: the transfer its chain of targets ends
        at (a reversal of a refund of a payment: the payment). Give-backs come grouped by
        family, in root order, each family in id order: a family's give-backs touch only
        its own transfers, so what is known of one is forgotten when the next starts and
        memory holds one family, whatever the history (`LedgerStore.verify` reads them so).

        A give-back mirrors the target's legs (sides swapped, one amount). A refund gives
        back a payment (posted, or a post) that stands, never past what it moved; a reversal
        undoes what stands: a payment, exactly what its refunds (less their reversals) left;
        a refund or a reversal, exactly its amount. Undoing a reversal makes its target
        stand again (and a payment undone once more, whose refunds came since, must still
        have room for it). A give-back's target comes before it."""
        self._enter_family(int(t["root"]))
        self.given_backs += 1
        where = f"transfer {t['id']}"
        if t["target_kind"] is None:
            raise Mismatch(f"{where}: gives back an unknown transfer ({t['target_id']})")
        if int(t["target_id"]) >= int(t["id"]):
            raise Mismatch(f"{where}: gives back transfer {t['target_id']}, which is not before it")
        postings = postings_from_json(t["postings"])
        target = postings_from_json(t["target_postings"])
        swapped = Counter(
            (p.account_id, str(Side.CREDIT if p.side is Side.DEBIT else Side.DEBIT)) for p in target
        )
        amounts = {p.amount for p in postings}
        if len(amounts) != 1 or Counter((p.account_id, str(p.side)) for p in postings) != swapped:
            raise Mismatch(f"{where}: does not mirror the legs of transfer {t['target_id']}")
        amount, whole, origin = amounts.pop(), target[0].amount, int(t["target_id"])
        target_kind = TransferKind(t["target_kind"])
        payment = target_kind in (TransferKind.POSTED, TransferKind.POST)
        if origin in self.undone:
            raise Mismatch(f"{where}: gives back transfer {origin}, which was undone")
        if TransferKind(t["kind"]) is TransferKind.REFUND:
            if not payment:
                raise Mismatch(f"{where}: refunds transfer {origin}, which is not a payment")
            if self.refunded.get(origin, 0) + amount > whole:
                raise Mismatch(f"{where}: refunds more than transfer {origin} moved")
            self.refunded[origin] = self.refunded.get(origin, 0) + amount
            return
        self._reversible(where, origin, target_kind, t["target_target_id"])
        if amount != (whole - self.refunded.get(origin, 0) if payment else whole):
            raise Mismatch(f"{where}: reverses other than what is left of transfer {origin}")
        rid = int(t["id"])
        if target_kind is TransferKind.REFUND:
            inner = int(t["target_target_id"])
            self.refunded[inner] = self.refunded.get(inner, 0) - amount
            self.reverses_refund.add(rid)
        self.ever_reversed.add(origin)
        self.reversal_of[rid], self.reversal_amount[rid] = origin, amount
        if payment:
            self.reversal_leg[rid] = whole
        self.undone.add(origin)
        current = origin  # undoing a reversal makes its target stand, and so on down
        while current in self.reversal_of:
            inner = self.reversal_of[current]
            if current in self.undone:
                self.undone.discard(inner)
            else:
                self.undone.add(inner)
                leg = self.reversal_leg.get(current)
                if (
                    leg is not None
                    and self.refunded.get(inner, 0) + (self.reversal_amount[current]) > leg
                ):
                    raise Mismatch(f"{where}: undoes transfer {inner} again past its refunds")
            current = inner

    def open_holds(self, stored: Iterable[tuple[int, int | None]]) -> None:
        """Compare the replayed unresolved holds with the working set (id, expires_at_ms)."""
        replayed = {tid: expires for tid, (_legs, expires) in self.holds.items()}
        kept = dict(stored)
        if kept != replayed:
            missing = sorted(set(replayed) - set(kept))
            extra = sorted(set(kept) - set(replayed))
            raise Mismatch(
                f"open holds: the journal leaves {sorted(replayed)}, the table holds "
                f"{sorted(kept)} (missing {missing}, extra {extra})"
            )

    def accounts(self, stored: Iterable[Account]) -> None:
        """Compare the replayed accounts (owner, asset, flags, balances) with the table."""
        for account in stored:
            self.account(account)
        self.accounts_end()

    def account(self, account: Account) -> None:
        """One stored account against the replay, in any order; `accounts_end` after the
        last. Which journal accounts the table had: one byte each, not a set of ids."""
        aid = account.id
        if aid not in self.balances:
            raise Mismatch(f"account {aid}: not in the journal")
        if account.balance != self.balances[aid]:
            raise Mismatch(
                f"account {aid}: stored {account.balance}, journal gives {self.balances[aid]}"
            )
        if account.info != self.infos[aid]:
            raise Mismatch(f"account {aid}: stored {account.info}, journal gives {self.infos[aid]}")
        if len(self._order) != len(self.balances):
            self._order = sorted(self.balances)
            self._stored = bytearray(len(self._order))
        self._stored[bisect.bisect_left(self._order, aid)] = 1

    def accounts_end(self) -> None:
        """Every account of the journal was stored (`account`); forgets which were."""
        order, stored = self._order, self._stored
        self._order, self._stored = [], bytearray()
        if len(order) != len(self.balances):  # none stored (or accounts came since)
            missing = set(self.balances).difference(order)
            missing.update(aid for aid, seen in zip(order, stored, strict=True) if not seen)
            if missing:
                raise Mismatch(f"account {min(missing)}: in the journal but not stored")
        elif (first := stored.find(0)) >= 0:
            raise Mismatch(f"account {order[first]}: in the journal but not stored")


def _check_floors(flags: AccountFlags, b: Balance, where: str) -> None:
    if min(b.debits_posted, b.credits_posted, b.debits_pending, b.credits_pending) < 0:
        raise Mismatch(f"{where}: negative balance field")
    if flags.no_overdraft and b.debits_posted + b.debits_pending > b.credits_posted:
        raise Mismatch(f"{where}: debits exceed credits on a no-overdraft account")
    if flags.no_overcredit and b.credits_posted + b.credits_pending > b.debits_posted:
        raise Mismatch(f"{where}: credits exceed debits on a no-overcredit account")
