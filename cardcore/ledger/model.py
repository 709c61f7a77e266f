"""The ledger's vocabulary: assets, accounts, requests, stored facts and results.

Pure data. No I/O, no asyncio, no SQLAlchemy (a unit test enforces it).

Every record here is a value: nothing mutates one after it is built. The records built per
transfer on the writer's hot path (AccountInfo, Balance, Account, Transfer, Entry, OutboxEvent,
Result)
are plain slotted dataclasses rather than frozen ones, because a frozen dataclass pays an
`object.__setattr__` call per field in `__init__`: about half of the decide time per transfer.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field


class Side(enum.StrEnum):
    DEBIT = "debit"
    CREDIT = "credit"


class AssetKind(enum.StrEnum):
    CURRENCY = "currency"  # CNY in fen
    POINTS = "points"  # a points program
    COUPON = "coupon"  # a coupon campaign's units
    SERVICE = "service"  # a service product's entitlements


class TransferKind(enum.StrEnum):
    POSTED = "posted"  # moves posted balances at once
    PENDING = "pending"  # a hold on pending balances
    POST = "post"  # completes a hold, in full or in part
    VOID = "void"  # releases a hold
    EXPIRE = "expire"  # releases a hold whose timeout passed (the ledger does this itself)
    REVERSE = "reverse"  # undoes what is left of a posted transfer, once (void, reversal)
    REFUND = "refund"  # gives back part of a posted transfer; all refunds <= the original


# The scope the ledger itself uses for the transfers it makes (expiries).
LEDGER_CLIENT = "ledger"

Metadata = tuple[tuple[str, str], ...]  # sorted (name, value) pairs
# Names a transfer's metadata may use. The POS adds to a purchase the card class and its
# discount in basis points (for reporting), and `requested` when a split tender took less
# than the terminal asked for. Adding a name never invalidates a stored journal.
METADATA_NAMES = frozenset(
    {
        "store",
        "terminal",
        "batch",
        "stan",
        "rrn",
        "operator",
        "external_ref",
        "card_class",
        "discount_bp",
        "requested",
    }
)


@dataclass(frozen=True, slots=True)
class Asset:
    code: str
    kind: AssetKind
    scale: int  # minor units per major unit = 10**scale (CNY: 2, points: 0)
    name: str


@dataclass(frozen=True, slots=True)
class AccountFlags:
    no_overdraft: bool = False  # debits (posted + pending) never exceed credits posted
    no_overcredit: bool = False  # credits (posted + pending) never exceed debits posted
    debit_frozen: bool = False  # refuses new debits
    credit_frozen: bool = False  # refuses new credits


@dataclass(slots=True)  # not frozen: see the note at the top
class AccountInfo:
    """What an account is; everything but its balances."""

    id: int
    asset: str
    legal_entity: str
    owner_kind: str
    owner_id: str
    purpose: str
    flags: AccountFlags

    @property
    def natural_key(self) -> str:
        return natural_key(
            self.legal_entity, self.owner_kind, self.owner_id, self.asset, self.purpose
        )


def natural_key(legal_entity: str, owner_kind: str, owner_id: str, asset: str, purpose: str) -> str:
    # '|' is outside the name alphabet the edges accept, so the key is unambiguous.
    return f"{legal_entity}|{owner_kind}|{owner_id}|{asset}|{purpose}"


@dataclass(slots=True)  # not frozen: see the note at the top
class Balance:
    debits_posted: int = 0
    credits_posted: int = 0
    debits_pending: int = 0
    credits_pending: int = 0
    version: int = 0


@dataclass(slots=True)  # not frozen: see the note at the top
class Account:
    info: AccountInfo
    balance: Balance

    @property
    def id(self) -> int:
        return self.info.id


# --- requests ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Posting:
    account_id: int
    side: Side
    amount: int


@dataclass(frozen=True, slots=True)
class CreateAsset:
    code: str
    kind: AssetKind
    scale: int
    name: str
    linked: bool = False


@dataclass(frozen=True, slots=True)
class CreateAccount:
    asset: str
    legal_entity: str
    owner_kind: str
    owner_id: str
    purpose: str
    flags: AccountFlags = AccountFlags()
    linked: bool = False


@dataclass(frozen=True, slots=True)
class SetAccountFrozen:
    account_id: int
    debit_frozen: bool | None = None  # None leaves the flag as it is
    credit_frozen: bool | None = None
    linked: bool = False


@dataclass(frozen=True, slots=True)
class CreateTransfer:
    client: str
    key: str
    asset: str
    postings: tuple[Posting, ...]
    pending: bool = False
    timeout_s: int | None = None  # pending only; None holds until posted or voided
    reason: str = ""
    metadata: Metadata = ()
    linked: bool = False


@dataclass(frozen=True, slots=True)
class PostPending:
    client: str
    key: str
    pending_id: int
    amount: int | None = None  # per leg; None posts the whole hold
    reason: str = ""
    metadata: Metadata = ()
    linked: bool = False


@dataclass(frozen=True, slots=True)
class VoidPending:
    client: str
    key: str
    pending_id: int
    reason: str = ""
    metadata: Metadata = ()
    linked: bool = False


@dataclass(frozen=True, slots=True)
class Reverse:
    """Undo what is left (after refunds) of the transfer keyed `target_key`, exactly once.

    With `tombstone` (a terminal's reversal, which may overtake its original), a target
    that never arrived is answered ok and its key is marked reversed, so the late original
    is refused; without it (a cashier's void) an unknown target is an error. With `whole`
    (a cashier's void: the whole sale or nothing) a target refunded in part is refused
    `target_partly_refunded`, where without it the rest is given back."""

    client: str
    key: str
    target_key: str
    tombstone: bool = False
    reason: str = ""
    metadata: Metadata = ()
    linked: bool = False
    whole: bool = False


@dataclass(frozen=True, slots=True)
class Refund:
    """Give back `amount` of the transfer keyed `target_key`; never more than what is left."""

    client: str
    key: str
    target_key: str
    amount: int
    reason: str = ""
    metadata: Metadata = ()
    linked: bool = False


@dataclass(frozen=True, slots=True)
class ExpirePending:
    """Made by the writer, never by a client: the hold's timeout has passed."""

    pending_id: int
    linked: bool = False


KeyedOp = CreateTransfer | PostPending | VoidPending | Reverse | Refund
Op = CreateAsset | CreateAccount | SetAccountFrozen | KeyedOp | ExpirePending


# --- stored facts --------------------------------------------------------------------------


@dataclass(slots=True)  # not frozen: see the note at the top
class Transfer:
    id: int
    client: str
    key: str
    kind: TransferKind
    asset: str
    postings: tuple[Posting, ...]  # for post: the amounts posted; for void/expire: released
    pending_id: int | None
    timeout_s: int | None
    expires_at_ms: int | None
    reason: str
    metadata: Metadata
    seq: int
    created_at_ms: int
    target_id: int | None = None  # reverse and refund: the transfer they give back


@dataclass(frozen=True, slots=True)
class Failure:
    """A keyed request that failed on a business rule; its key stays failed for ever."""

    client: str
    key: str
    request: Mapping[str, object]  # the canonical request, see `decide.canonical_request`
    code: str
    field: str | None
    seq: int
    created_at_ms: int


@dataclass(frozen=True, slots=True)
class PendingState:
    transfer: Transfer
    resolved_by: TransferKind | None  # post, void or expire; None while the hold is open


@dataclass(slots=True)  # not frozen: see the note at the top
class Entry:
    """One line of the journal: a posting's effect and the account's balance after it."""

    id: int
    seq: int
    transfer_id: int
    account_id: int
    side: Side
    posted_delta: int
    pending_delta: int
    balance: Balance  # after this entry; balance.version is the account's version


@dataclass(frozen=True, slots=True)
class AccountEvent:
    """An account created or its flags changed; carries the account as it now is."""

    id: int
    seq: int
    kind: str  # "create" | "flags"
    account: AccountInfo


@dataclass(slots=True)  # not frozen: see the note at the top
class OutboxEvent:
    id: int
    seq: int
    event: str  # transfer.posted | transfer.pending | transfer.voided | transfer.expired
    transfer_id: int


# --- results -------------------------------------------------------------------------------


@dataclass(slots=True)  # not frozen: see the note at the top
class Result:
    ok: bool
    code: str
    seq: int | None = None
    transfer_id: int | None = None
    account_id: int | None = None
    asset: str | None = None
    field: str | None = None
    original_code: str | None = None  # id_already_failed: the code the key first failed with
    replayed: bool = False  # True when the key (or natural key) was already applied
    # A new transfer: the balance after it of every account it moved (in-process callers
    # answer with a balance without reading it back; not part of the JSON answer).
    balances: dict[int, Balance] | None = None


@dataclass(slots=True)
class LedgerView:
    """What the writer read from the database for one batch: the inputs to `decide_batch`."""

    assets: dict[str, Asset] = field(default_factory=dict)
    accounts: dict[int, Account] = field(default_factory=dict)
    account_ids_by_natural_key: dict[str, int] = field(default_factory=dict)
    transfers_by_key: dict[tuple[str, str], Transfer] = field(default_factory=dict)
    failures_by_key: dict[tuple[str, str], Failure] = field(default_factory=dict)
    pendings: dict[int, PendingState] = field(default_factory=dict)
    # For the targets of reverse and refund operations (and the originals of refunds named
    # as targets): the transfer that reversed each, and the amount refunded and not reversed.
    reversed_by: dict[int, int] = field(default_factory=dict)
    refunded: dict[int, int] = field(default_factory=dict)
    # The kind of what a reversal target itself reversed (a reversed refund is final).
    kinds: dict[int, TransferKind] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class IdCounters:
    """The next free ids; the single writer owns them."""

    account: int
    transfer: int
    entry: int
    account_event: int
    outbox: int
