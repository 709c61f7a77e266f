"""Cards and POS terminals as the host sees them, and the POS requests the front-end gateway
sends: their JSON form, their keys in the ledger, and their answers. Pure.

A POS request names the terminal and, for card functions, the card number (PAN). The host
turns it into ledger operations (`cardcore.cards.pos`); the gateway turns the answer into an
ISO 8583 response code. The JSON body of `POST /internal/v1/pos` is

    {"requests": [{"kind": "purchase", "terminal": "T0000001", "batch": "000001",
                   "stan": "000123", "card": "6288...", "amount": 2500}, ...]}
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from typing import Any

from cardcore import limits

# The ledger scope of every POS transfer, and the asset of stored value.
POS_CLIENT = "pos"
CURRENCY = "CNY"


class Kind(enum.StrEnum):
    SIGN_ON = "sign_on"  # the terminal's record and the batch it must use
    INQUIRY = "inquiry"
    PURCHASE = "purchase"
    VOID = "void"  # same batch, names the original by batch and STAN
    REFUND = "refund"  # later, names the original by its RRN; never more than it
    TOPUP = "topup"  # a hold on the card until the terminal confirms it
    TOPUP_CONFIRM = "topup_confirm"
    REVERSE = "reverse"  # the terminal's (or the gateway's) reversal of batch + STAN
    SETTLE = "settle"  # the host's totals for a batch; closes it when they match
    UPLOAD = "upload"  # batch upload: the terminal's own lines, compared with the host's
    # Issue 5's functions (private processing codes 90..98; docs/card-protocol.md 5.11)
    POINTS_EARN = "points_earn"  # a purchase paid some other way earns points on the card
    POINTS_REDEEM = "points_redeem"  # points as payment: the store is paid in money
    POINTS_RETURN = "points_return"  # goods of a POINTS_EARN come back: its share clawed back
    COUPON_QUERY = "coupon_query"  # what a coupon would take off this bill, changing nothing
    COUPON_RESERVE = "coupon_reserve"  # held for this transaction until confirmed or released
    COUPON_REDEEM = "coupon_redeem"  # confirm a reservation (or reserve and redeem at once)
    COUPON_REVERSE = "coupon_reverse"  # release a reservation, or undo a redemption
    SERVICE_REDEEM = "service_redeem"  # use entitlements of a service package on the card
    MANAGER_AUTH = "manager_auth"  # a manager's card and PIN authorize a special discount


# Kinds a feature service answers through `PosService.features` (coupons, service and
# manager cards); a kind with no service registered answers function_not_supported.
FEATURE_KINDS = frozenset(
    {
        Kind.COUPON_QUERY,
        Kind.COUPON_RESERVE,
        Kind.COUPON_REDEEM,
        Kind.COUPON_REVERSE,
        Kind.SERVICE_REDEEM,
        Kind.MANAGER_AUTH,
    }
)


class Outcome(enum.StrEnum):
    """The host's answer; the gateway maps each to one ISO 8583 response code."""

    APPROVED = "approved"
    PARTIAL_APPROVED = "partial_approved"  # split tender: the balance taken, the rest due
    TERMINAL_UNKNOWN = "terminal_unknown"
    TERMINAL_DISABLED = "terminal_disabled"
    BATCH_MISMATCH = "batch_mismatch"  # the terminal must sign on again to learn the batch
    CARD_NOT_FOUND = "card_not_found"  # unknown number or a wrong check digit
    CARD_NOT_ACTIVE = "card_not_active"  # issued, not yet activated (sold)
    CARD_FROZEN = "card_frozen"
    CARD_LOST = "card_lost"
    CARD_CLOSED = "card_closed"  # closed or replaced: dead for ever
    CARD_EXPIRED = "card_expired"
    PIN_REQUIRED = "pin_required"  # the card has a PIN and the request carries none
    PIN_WRONG = "pin_wrong"
    PIN_LOCKED = "pin_locked"  # too many wrong PINs in a row: an officer must unlock it
    INSUFFICIENT_FUNDS = "insufficient_funds"
    OVER_LIMIT = "over_limit"  # a top-up past the card's maximum balance
    ORIGINAL_NOT_FOUND = "original_not_found"
    ORIGINAL_MISMATCH = "original_mismatch"  # void or refund of another card or amount
    ALREADY_REVERSED = "already_reversed"
    REFUND_EXCEEDS_ORIGINAL = "refund_exceeds_original"
    REVERSED_BEFORE_ARRIVAL = "reversed_before_arrival"  # a late original after its reversal
    BATCH_SETTLED = "batch_settled"  # a terminal's reversal of a batch it settled since
    DUPLICATE_MISMATCH = "duplicate_mismatch"  # same terminal, batch and STAN, other content
    FUNCTION_NOT_SUPPORTED = "function_not_supported"
    NOT_PERMITTED = "not_permitted"  # the rules refuse it (scope, limits, holder): `refusal`
    COUPON_UNKNOWN = "coupon_unknown"  # no such code (or a wrong check symbol)
    COUPON_USED = "coupon_used"  # redeemed, or held by another transaction
    COUPON_EXPIRED = "coupon_expired"  # outside its validity window, or its campaign ended
    BAD_REQUEST = "bad_request"
    UNAVAILABLE = "unavailable"  # the ledger could not decide now: retry or reverse


@dataclass(frozen=True, slots=True)
class Terminal:
    tid: str  # F41, 8 characters
    mid: str  # F42, 15 characters
    store: str
    legal_entity: str
    key_mode: str  # "aes" | "3des" (cardcore.frontend_gateway.security.KeyMode)
    tmk_sealed: str  # hex; the master key sealed under the key-encrypting key
    state: str  # "active" | "disabled"
    batch: str  # the open batch, six digits
    batch_cycle: int  # how often the batch number wrapped: part of every ledger key
    sales_account: int
    cash_account: int
    # "cycle/batch" of the batch of its last key claimed by a feature request (`pos_claims`),
    # "" none since it was registered or its batch closed, None not known (registered before
    # migration 0016): its money keys are read against the claims only while it may have one.
    claims_batch: str | None = None


def may_have_claims(t: Terminal) -> bool:
    """Whether a key of the terminal's open batch may stand claimed."""
    return t.claims_batch is None or t.claims_batch == f"{t.batch_cycle}/{t.batch}"


def claims_mark(key: str) -> tuple[str, str]:
    """(terminal, "cycle/batch") of a `transaction_key`."""
    tid, cycle, batch, _ = key.split("/")
    return tid, f"{cycle}/{batch}"


class CardState(enum.StrEnum):
    INACTIVE = "inactive"  # issued, not yet activated (a gift card before its sale)
    ACTIVE = "active"
    FROZEN = "frozen"  # by an officer; unfreeze brings it back
    LOST = "lost"  # reported lost: dead for payments until replaced
    CLOSED = "closed"  # value refunded; dead for ever
    REPLACED = "replaced"  # its successor carries the account; dead for ever


# What the POS answers for a card that is not active (expiry is checked on its own).
OUTCOME_OF_STATE: dict[str, str] = {
    CardState.INACTIVE: "card_not_active",
    CardState.FROZEN: "card_frozen",
    CardState.LOST: "card_lost",
    CardState.CLOSED: "card_closed",
    CardState.REPLACED: "card_closed",
}
# States in which money may still go back to the card (a void, a refund): it stays on the
# card's account, unusable while the card is frozen or lost, and carried to the successor
# of a lost card. A closed card's value was paid out and a replaced card's account belongs
# to its successor: both refuse (the successor card takes the refund). A reversal never
# looks at the card: it is always taken.
GIVE_BACK_STATES: frozenset[str] = frozenset({CardState.ACTIVE, CardState.FROZEN, CardState.LOST})


def outcome_of_state(state: str) -> Outcome:
    """The POS answer for a card in `state` that may not do what is asked."""
    return Outcome(OUTCOME_OF_STATE.get(state, "card_closed"))  # unknown: never usable


@dataclass(frozen=True, slots=True)
class Card:
    """A card as the POS path needs it (cached by token). The member, the PIN verification
    value and the failure counter are read fresh where they matter, never from here."""

    token: str  # keyed hash of the PAN
    pan_masked: str
    legal_entity: str  # the issuing entity: owns the card's value
    account_id: int  # the value account (stored value, or gift value for a gift class)
    expires: str  # YYMM; "" never
    state: str  # CardState
    balance_max: int  # the class's maximum balance in fen; 0 means no maximum
    id: int = 0
    class_code: str = ""
    store: str = ""  # the issuing store
    named: bool = False
    has_pin: bool = False


def unusable_outcome(card: Card | None, *, giving_back: bool = False) -> Outcome | None:
    """A card read again under its account's lock: None when it may still do what it was
    asked (active; when giving back, also frozen or lost: `GIVE_BACK_STATES`), else the POS
    answer of its state. A card no longer found counts as closed."""
    state = CardState.CLOSED if card is None else card.state
    allowed = GIVE_BACK_STATES if giving_back else frozenset({CardState.ACTIVE})
    return None if state in allowed else outcome_of_state(state)


@dataclass(frozen=True, slots=True)
class CardClass:
    """A card product defined by the user (ordinary, VIP, corporate, a gift card, ...)."""

    code: str
    name: str
    named: bool  # named to a member, or bearer
    gift: bool  # a gift card: sold at a face value from `denominations`
    denominations: tuple[int, ...]  # fen
    discount_bp: int  # basis points off the price (500 = 5 % off; member price)
    points_multiplier_pct: int  # 100 = the program's own rate
    issue_fee: int  # fen
    replace_fee: int  # fen
    balance_max: int  # fen; 0 = no maximum
    validity_months: int  # 0 = no expiry
    state: str  # "active" | "retired"
    points_program: str = ""  # the points program its cards earn in ("" = none)


BASIS_POINTS = 10_000  # 100 % in basis points


def member_price(amount: int, discount_bp: int) -> int:
    """The price after the class discount, rounded to the member's favour (down), in fen."""
    if not discount_bp:
        return amount
    return amount - (amount * discount_bp + BASIS_POINTS - 1) // BASIS_POINTS


def value_postings(
    *,
    source: int,
    target: int,
    amount: int,
    clearing: tuple[int, int] | None,
) -> tuple[tuple[int, str, int], ...]:
    """(account, side, amount) legs moving `amount` from `source` to `target`. With
    `clearing` = (due_to of the entity that owes, due_from of the entity that is owed) the
    value crosses legal entities: each entity's own legs balance by themselves, and the
    clearing pair records what one owes the other until HQ nets them at settlement."""
    if clearing is None:
        return ((source, "debit", amount), (target, "credit", amount))
    due_to, due_from = clearing
    return (
        (source, "debit", amount),
        (due_to, "credit", amount),
        (due_from, "debit", amount),
        (target, "credit", amount),
    )


@dataclass(frozen=True, slots=True)
class PosRequest:
    kind: Kind
    terminal: str
    batch: str = ""
    stan: str = ""
    card: str = field(default="", repr=False)  # PAN digits; never logged
    amount: int = 0
    original_batch: str = ""  # void, top-up confirmation
    original_stan: str = ""
    rrn: str = ""  # refund, points return: the original's retrieval reference number
    operator: str = ""
    date: str = ""  # F13 MMDD, as the terminal sent it (matching never depends on it)
    totals: tuple[int, int, int, int] = (0, 0, 0, 0)  # settle: debit amt, cnt, credit amt, cnt
    lines: tuple[tuple[str, int], ...] = ()  # upload: (stan, amount) per transaction
    pin_block: str = field(default="", repr=False)  # format 4 under the zone PIN key
    partial: bool = False  # purchase: the terminal takes a partial approval (F60.6 = 1)
    # issue 5 (F48 TLV on the wire)
    basket: tuple[tuple[str, int], ...] = ()  # (department[/category], fen) lines of the bill
    coupon: str = field(default="", repr=False)  # a coupon code, or a signed QR text
    sale: str = ""  # coupons: the terminal's sale number; the coupons of one sale share it
    points: int = 0  # points redeem: the points to spend
    product: str = ""  # service redemption: the product code ("" = the card's choice)
    uses: int = 0  # service redemption: entitlements to use
    reason: str = ""  # manager authorization: the reason code
    discount: int = 0  # manager authorization: the discount asked, in fen
    # reversal: delivered from the gateway's store and forward (a reversal it answered or
    # owed while the host was away), not sent by the terminal just now: taken even for a
    # batch settled since
    forwarded: bool = False


@dataclass(frozen=True, slots=True)
class PosResult:
    outcome: Outcome
    balance: int | None = None  # the card's available balance after the request
    amount: int | None = None  # what was taken or given
    rrn: str = ""
    auth_code: str = ""
    batch: str = ""  # sign-on: the batch the terminal must use
    totals: tuple[int, int, int, int] | None = None  # settle: the host's totals
    balanced: bool | None = None  # settle and upload
    unmatched: tuple[str, ...] = ()  # upload: STANs the host and the terminal disagree on
    replayed: bool = False
    # sign_on: what the gateway needs to run the terminal's session
    mid: str = ""
    key_mode: str = ""
    tmk_sealed: str = ""
    discount_bp: int | None = None  # inquiry: the card class's discount (member price)
    remainder: int | None = None  # partial approval: what the terminal must still collect
    # issue 5
    points: int | None = None  # earned (purchase, earn) or spent (redeem) by this request
    points_balance: int | None = None  # the card's spendable points after it
    discount: int | None = None  # coupon or manager discount granted, in fen
    forfeited: int | None = None  # coupon: face value the bill could not use (no change)
    uses_left: int | None = None  # service redemption: entitlements left in the package
    refusal: str = ""  # the rules' stable code when not approved (F48, logs)
    campaign: str = ""  # coupon: its campaign code
    rewards: tuple[str, ...] = ()  # purchase: coupon codes it earned (instant reward)

    def json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"outcome": str(self.outcome)}
        for name in (
            "balance",
            "amount",
            "totals",
            "balanced",
            "discount_bp",
            "remainder",
            "points",
            "points_balance",
            "discount",
            "forfeited",
            "uses_left",
        ):
            value = getattr(self, name)
            if value is not None:
                out[name] = list(value) if isinstance(value, tuple) else value
        for name in (
            "rrn",
            "auth_code",
            "batch",
            "mid",
            "key_mode",
            "tmk_sealed",
            "refusal",
            "campaign",
        ):
            if getattr(self, name):
                out[name] = getattr(self, name)
        if self.unmatched:
            out["unmatched"] = list(self.unmatched)
        if self.rewards:
            out["rewards"] = list(self.rewards)
        if self.replayed:
            out["replayed"] = True
        return out


def result_from_json(raw: dict[str, Any]) -> PosResult:
    """The gateway's side of `PosResult.json` (the host is trusted; shapes are still checked)."""
    totals = raw.get("totals")
    return PosResult(
        outcome=Outcome(raw["outcome"]),
        balance=_opt_int(raw.get("balance")),
        amount=_opt_int(raw.get("amount")),
        rrn=str(raw.get("rrn", "")),
        auth_code=str(raw.get("auth_code", "")),
        batch=str(raw.get("batch", "")),
        totals=None
        if totals is None
        else (int(totals[0]), int(totals[1]), int(totals[2]), int(totals[3])),
        balanced=raw.get("balanced"),
        unmatched=tuple(str(s) for s in raw.get("unmatched", ())),
        replayed=bool(raw.get("replayed", False)),
        mid=str(raw.get("mid", "")),
        key_mode=str(raw.get("key_mode", "")),
        tmk_sealed=str(raw.get("tmk_sealed", "")),
        discount_bp=_opt_int(raw.get("discount_bp")),
        remainder=_opt_int(raw.get("remainder")),
        points=_opt_int(raw.get("points")),
        points_balance=_opt_int(raw.get("points_balance")),
        discount=_opt_int(raw.get("discount")),
        forfeited=_opt_int(raw.get("forfeited")),
        uses_left=_opt_int(raw.get("uses_left")),
        refusal=str(raw.get("refusal", "")),
        campaign=str(raw.get("campaign", "")),
        rewards=tuple(str(code) for code in raw.get("rewards", ())),
    )


def _opt_int(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError("expected an integer")
    return value


# --- keys in the ledger ----------------------------------------------------------------------


TERMINAL_ID_CHARS = 8  # F41, ans 8


def is_terminal_id(text: str) -> bool:
    """A terminal id: eight ASCII letters or digits (F41)."""
    return len(text) == TERMINAL_ID_CHARS and text.isascii() and text.isalnum()


def transaction_key(t: Terminal, batch: str, stan: str) -> str:
    """The idempotency key of one terminal transaction: terminal, batch cycle, batch, STAN.
    The cycle makes a batch number that wrapped (999999 -> 000001) a new key space. Batch
    numbers only grow within a cycle, so a batch above the open one is of the cycle before
    (a reversal stored and forwarded across the wrap)."""
    cycle = t.batch_cycle - 1 if batch > t.batch and t.batch_cycle > 0 else t.batch_cycle
    return f"{t.tid}/{cycle}/{batch}/{stan}"


def reversal_key(t: Terminal, batch: str, stan: str) -> str:
    return transaction_key(t, batch, stan) + "/R"


def batch_prefix(t: Terminal, batch: str) -> str:
    return f"{t.tid}/{t.batch_cycle}/{batch}/"


def rrn_of(transfer_id: int) -> str:
    """The retrieval reference number: the ledger transfer id, twelve digits."""
    return f"{transfer_id:012d}"


def auth_code_of(transfer_id: int) -> str:
    return f"{transfer_id % 1_000_000:06d}"


def next_batch(batch: str) -> tuple[str, bool]:
    """The batch after `batch`, and whether the number wrapped (999999 -> 000001)."""
    value = int(batch) + 1
    if value > 999_999:
        return "000001", True
    return f"{value:06d}", False


# --- card numbers ------------------------------------------------------------------------------


def luhn_ok(pan: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(pan)):
        d = ord(ch) - 48
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def luhn_digit(body: str) -> str:
    for d in "0123456789":
        if luhn_ok(body + d):
            return d
    raise AssertionError("unreachable")


def mask_pan(pan: str) -> str:
    """First six and last four digits, the rest starred: what logs and answers may show."""
    if len(pan) < 12:
        return "*" * len(pan)
    return pan[:6] + "*" * (len(pan) - 10) + pan[-4:]


# --- totals --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BatchLine:
    """One transfer of a terminal batch, as the ledger holds it."""

    id: int
    key: str
    kind: str  # ledger transfer kind
    reason: str  # purchase | topup | void | refund | reversal | topup_confirm
    amount: int
    target_id: int | None


@dataclass(frozen=True, slots=True)
class Settlement:
    """A closed batch's settlement as recorded: the host's totals, the terminal's, and
    whether they balanced (what a lost 0510 or 0330 is answered again)."""

    host: tuple[int, int, int, int]
    terminal: tuple[int, int, int, int]
    balanced: bool


def batch_totals(lines: list[BatchLine]) -> tuple[int, int, int, int]:
    """(debit amount, debit count, credit amount, credit count) of a terminal batch, the way
    the terminal counts them: purchases are debits, refunds and confirmed top-ups credits;
    a voided or reversed transaction counts in neither, nor do the voids and reversals."""
    reversed_ids = _reversed(lines)
    debit_amount = debit_count = credit_amount = credit_count = 0
    for x in lines:
        if x.id in reversed_ids:
            continue
        if x.reason == "purchase":
            debit_amount += x.amount
            debit_count += 1
        elif x.reason in ("refund", "topup_confirm"):
            credit_amount += x.amount
            credit_count += 1
    return debit_amount, debit_count, credit_amount, credit_count


def _reversed(lines: list[BatchLine]) -> set[int]:
    """Transfers whose reversal stands: each transfer is reversed at most once, and a
    reversal may itself be reversed (a void the terminal reversed), and that one too (the
    purchase voided again): a transfer is undone when its chain of reversals is odd."""
    reversal_of = {
        x.target_id: x.id for x in lines if x.kind == "reverse" and x.target_id is not None
    }
    out = set()
    for target in reversal_of:
        hops, at = 0, target
        while at in reversal_of and hops <= len(reversal_of):
            at, hops = reversal_of[at], hops + 1
        if hops % 2 == 1:
            out.add(target)
    return out


def stans_of(lines: list[BatchLine], prefix: str) -> dict[str, int]:
    """STAN -> amount of the batch's live purchases, refunds and confirmed top-ups."""
    reversed_ids = _reversed(lines)
    out = {}
    for x in lines:
        if x.id in reversed_ids or x.reason not in ("purchase", "refund", "topup_confirm"):
            continue
        rest = x.key[len(prefix) :]
        out[rest.split("/")[0]] = x.amount
    return out


# --- request parsing ----------------------------------------------------------------------------

_DIGITS = re.compile(r"[0-9]+")
_TID = re.compile(r"[A-Za-z0-9]{8}")
_FIELDS = frozenset(
    {
        "kind",
        "terminal",
        "batch",
        "stan",
        "card",
        "amount",
        "original_batch",
        "original_stan",
        "rrn",
        "operator",
        "date",
        "totals",
        "lines",
        "pin_block",
        "partial",
        "basket",
        "coupon",
        "points",
        "product",
        "uses",
        "reason",
        "discount",
        "sale",
        "forwarded",
    }
)


class PosRequestError(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def parse_requests(body: object) -> list[PosRequest | PosRequestError]:
    """The call's requests. A request that does not parse stands as its error, in its
    place: one terminal's bad request never fails the others batched with it."""
    if not isinstance(body, dict) or set(body) != {"requests"}:
        raise PosRequestError("requests", 'expected {"requests": [...]}')
    raw = body["requests"]
    if not isinstance(raw, list) or not 1 <= len(raw) <= limits.POS_REQUESTS_PER_CALL_MAX:
        raise PosRequestError(
            "requests", f"1..{limits.POS_REQUESTS_PER_CALL_MAX} requests in an array"
        )
    out: list[PosRequest | PosRequestError] = []
    for i, r in enumerate(raw):
        try:
            out.append(parse_request(r, f"requests[{i}]"))
        except PosRequestError as exc:
            out.append(exc)
    return out


def parse_request(raw: object, path: str) -> PosRequest:
    if not isinstance(raw, dict):
        raise PosRequestError(path, "expected an object")
    unknown = set(raw) - _FIELDS
    if unknown:
        raise PosRequestError(f"{path}.{min(unknown)}", "unknown field")
    try:
        kind = Kind(str(raw.get("kind")))
    except ValueError:
        raise PosRequestError(f"{path}.kind", f"one of {[k.value for k in Kind]}") from None
    terminal = raw.get("terminal")
    if not isinstance(terminal, str) or not _TID.fullmatch(terminal):
        raise PosRequestError(f"{path}.terminal", "eight letters or digits")

    def digits(name: str, low: int, high: int) -> str:
        value = raw.get(name, "")
        if not isinstance(value, str) or (value and not _DIGITS.fullmatch(value)):
            raise PosRequestError(f"{path}.{name}", "a string of digits")
        if value and not low <= len(value) <= high:
            raise PosRequestError(f"{path}.{name}", f"{low}..{high} digits")
        return value

    amount = raw.get("amount", 0)
    if isinstance(amount, bool) or not isinstance(amount, int):
        raise PosRequestError(f"{path}.amount", "an integer in fen")
    if not 0 <= amount <= limits.POS_AMOUNT_MAX:
        raise PosRequestError(f"{path}.amount", f"0..{limits.POS_AMOUNT_MAX}")
    operator = raw.get("operator", "")
    if not isinstance(operator, str) or len(operator) > 16 or not operator.isascii():
        raise PosRequestError(f"{path}.operator", "at most 16 ASCII characters")
    totals = raw.get("totals", [0, 0, 0, 0])
    bounds = (limits.POS_AMOUNT_MAX, limits.POS_TOTALS_COUNT_MAX) * 2
    if (
        not isinstance(totals, list)
        or len(totals) != 4
        or not all(
            isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= most
            for x, most in zip(totals, bounds, strict=True)
        )
    ):
        raise PosRequestError(
            f"{path}.totals",
            f"[debit fen 0..{limits.POS_AMOUNT_MAX}, count 0..{limits.POS_TOTALS_COUNT_MAX}, "
            "credit fen, count]",
        )
    lines = raw.get("lines", [])
    if not isinstance(lines, list) or len(lines) > limits.POS_UPLOAD_LINES_MAX:
        raise PosRequestError(f"{path}.lines", f"at most {limits.POS_UPLOAD_LINES_MAX} lines")
    parsed_lines = []
    for line in lines:
        if (
            not isinstance(line, list)
            or len(line) != 2
            or not isinstance(line[0], str)
            or not re.fullmatch(r"[0-9]{6}", line[0])
            or isinstance(line[1], bool)
            or not isinstance(line[1], int)
            or not 0 <= line[1] <= limits.POS_AMOUNT_MAX
        ):
            raise PosRequestError(
                f"{path}.lines", f"[stan, amount 0..{limits.POS_AMOUNT_MAX}] pairs"
            )
        parsed_lines.append((line[0], line[1]))
    partial, forwarded = raw.get("partial", False), raw.get("forwarded", False)
    if not isinstance(partial, bool):
        raise PosRequestError(f"{path}.partial", "true or false")
    if not isinstance(forwarded, bool):
        raise PosRequestError(f"{path}.forwarded", "true or false")
    extra = _issue_5_fields(raw, path)
    return PosRequest(
        kind=kind,
        terminal=terminal,
        batch=digits("batch", 6, 6),
        stan=digits("stan", 6, 6),
        card=digits("card", 12, 19),
        amount=amount,
        original_batch=digits("original_batch", 6, 6),
        original_stan=digits("original_stan", 6, 6),
        rrn=digits("rrn", 12, 12),
        operator=operator,
        date=digits("date", 4, 4),
        totals=(totals[0], totals[1], totals[2], totals[3]),
        lines=tuple(parsed_lines),
        pin_block=_pin_block(raw.get("pin_block", ""), f"{path}.pin_block"),
        partial=partial,
        forwarded=forwarded,
        **extra,
    )


# One line of a bill (F48 `BL`): its department, and optionally "/" and its category.
BASKET_LINE = re.compile(r"[A-Za-z0-9_.-]{1,32}(?:/[A-Za-z0-9_.-]{1,32})?")


def line_parts(label: str) -> tuple[str, str]:
    """(department, category) of a basket line's label ("" without a category)."""
    department, _, category = label.partition("/")
    return department, category


_PRINTABLE = re.compile(r"[\x21-\x7e]*")
_REASON = re.compile(rf"[a-z][a-z0-9_]{{0,{limits.MANAGER_REASON_CHARS_MAX - 1}}}")
_SALE = re.compile(r"[A-Za-z0-9_.-]*")


def _issue_5_fields(raw: dict[str, Any], path: str) -> dict[str, Any]:
    """The basket, coupon, points, service and manager fields of a request, checked."""

    def count(name: str, high: int) -> int:
        value = raw.get(name, 0)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= high:
            raise PosRequestError(f"{path}.{name}", f"an integer 0..{high}")
        return value

    def text(name: str, pattern: re.Pattern[str], most: int) -> str:
        value = raw.get(name, "")
        if not isinstance(value, str) or len(value) > most or not pattern.fullmatch(value):
            raise PosRequestError(f"{path}.{name}", f"at most {most} printable ASCII characters")
        return value

    basket = raw.get("basket", [])
    if not isinstance(basket, list) or len(basket) > limits.POS_BASKET_LINES_MAX:
        raise PosRequestError(f"{path}.basket", f"at most {limits.POS_BASKET_LINES_MAX} lines")
    lines: list[tuple[str, int]] = []
    for line in basket:
        if (
            not isinstance(line, list)
            or len(line) != 2
            or not isinstance(line[0], str)
            or not BASKET_LINE.fullmatch(line[0])
            or isinstance(line[1], bool)
            or not isinstance(line[1], int)
            or not 0 <= line[1] <= limits.POS_AMOUNT_MAX
        ):
            raise PosRequestError(f"{path}.basket", "[department[/category], fen] pairs")
        lines.append((line[0], line[1]))
    reason = raw.get("reason", "")
    if not isinstance(reason, str) or (reason and not _REASON.fullmatch(reason)):
        raise PosRequestError(
            f"{path}.reason",
            f"a reason code: a-z, 0-9, _ ({limits.MANAGER_REASON_CHARS_MAX} at most)",
        )
    return {
        "basket": tuple(lines),
        "coupon": text("coupon", _PRINTABLE, limits.COUPON_QR_CHARS_MAX),
        "points": count("points", limits.POINTS_PER_TXN_MAX),
        "product": text("product", _PRINTABLE, limits.SERVICE_PRODUCT_CHARS_MAX),
        "uses": count("uses", limits.SERVICE_USES_MAX),
        "reason": reason,
        "discount": count("discount", limits.POS_AMOUNT_MAX),
        "sale": text("sale", _SALE, limits.POS_SALE_CHARS_MAX),
    }


def _pin_block(value: object, where: str) -> str:
    if not isinstance(value, str) or (value and not re.fullmatch(r"[0-9A-F]{32}", value)):
        raise PosRequestError(where, "32 upper-case hex digits")
    return value


def request_json(r: PosRequest) -> dict[str, Any]:
    """The JSON form `parse_request` reads back (what the gateway's HTTP adapter sends)."""
    out: dict[str, Any] = {"kind": str(r.kind), "terminal": r.terminal}
    for name in (
        "batch",
        "stan",
        "card",
        "original_batch",
        "original_stan",
        "rrn",
        "operator",
        "date",
        "pin_block",
    ):
        if getattr(r, name):
            out[name] = getattr(r, name)
    if r.amount:
        out["amount"] = r.amount
    if r.kind in (Kind.SETTLE, Kind.UPLOAD):
        out["totals"] = list(r.totals)
    if r.lines:
        out["lines"] = [list(x) for x in r.lines]
    if r.partial:
        out["partial"] = True
    if r.forwarded:
        out["forwarded"] = True
    if r.basket:
        out["basket"] = [list(x) for x in r.basket]
    for name in ("coupon", "product", "reason", "sale"):
        if getattr(r, name):
            out[name] = getattr(r, name)
    for name in ("points", "uses", "discount"):
        if getattr(r, name):
            out[name] = getattr(r, name)
    return out
