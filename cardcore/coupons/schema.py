"""E-coupon tables (SQLAlchemy Core, on the ledger's MetaData); migration 0005 makes them
(0013 adds `coupon_codes.spelling`).

A code's life is one row whose state moves by guarded updates (`issued -> reserved ->
redeemed`, back by release or reversal), so two terminals racing for one code meet in the
database: exactly one update matches. No two codes share a normalised form (`spelling`, a
unique index; some older codes have none, see the column), so two imports of confusable
codes at the same moment meet in the database too. Redemptions are recorded per POS key
with their cost by funder (supplier settlement reads them). Signing keys: one Ed25519 key
pair per issuing legal entity and key id, the private half sealed by the vault.
"""

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Index,
    Integer,
    Select,
    String,
    Table,
    Text,
    bindparam,
    func,
    literal_column,
    select,
    true,
)

from cardcore import limits
from cardcore.cards.schema import cards
from cardcore.ledger.schema import metadata
from cardcore.members.schema import members
from cardcore.points.schema import points_earnings

CODE = 32
NAME = limits.NAME_CHARS_MAX
KEY = 160

coupon_campaigns = Table(
    "coupon_campaigns",
    metadata,
    Column("code", String(CODE), primary_key=True),
    Column("name", String(NAME), nullable=False),
    Column("legal_entity", String(CODE), nullable=False),  # the issuer (its QR key)
    Column("store", String(CODE), nullable=False),  # "" = an HQ or entity campaign
    Column("definition", Text, nullable=False),  # the model Campaign as JSON
    Column("state", String(16), nullable=False),
    Column("issued_count", BigInteger, nullable=False),
    Column("issued_value", BigInteger, nullable=False),
    Column("redeemed_count", BigInteger, nullable=False),
    Column("redeemed_value", BigInteger, nullable=False),
    Column("store_cost", BigInteger, nullable=False),
    Column("supplier_cost", BigInteger, nullable=False),
    Column("created_at_ms", BigInteger, nullable=False),
    Column("updated_at_ms", BigInteger, nullable=False),
)

coupon_codes = Table(
    "coupon_codes",
    metadata,
    Column("code", String(40), primary_key=True),  # normalized, with its check symbol
    Column("campaign", String(CODE), nullable=False),
    Column("member_id", Integer, nullable=True),
    Column("batch", Integer, nullable=True),
    Column("source", String(16), nullable=False),  # generated | imported | points | rule
    # issued | reserved | redeemed | voided (model.CodeStatus; "expired" is computed)
    Column("state", String(16), nullable=False),
    Column("valid_from_ms", BigInteger, nullable=False),
    Column("valid_to_ms", BigInteger, nullable=False),
    Column("reserved_key", String(KEY), nullable=True),  # the POS key holding it
    Column("reserved_until_ms", BigInteger, nullable=True),
    Column("redeemed_key", String(KEY), nullable=True),
    Column("redeemed_at_ms", BigInteger, nullable=True),
    Column("issued_at_ms", BigInteger, nullable=False),
    Column("version", Integer, nullable=False),
    # The code's normalised form (`model.normalize`: how a till reads a typed code), unique:
    # two codes a cashier could confuse are never both stored with one, so two imports
    # committing at the same moment meet here. Every insert writes it. NULL (migration
    # 0013): a code stored by code older than 0013, or one left out by 0013 because a code
    # issued before it has its normalised form; the index does not guard those.
    Column("spelling", String(40), nullable=True),
    Index(None, "campaign", "state"),
    Index(None, "member_id"),
    Index(None, "batch"),
    Index(None, "spelling", unique=True),
)

coupon_redemptions = Table(
    "coupon_redemptions",
    metadata,
    Column("key", String(KEY), primary_key=True),  # the POS key (terminal, batch, STAN)
    Column("code", String(40), nullable=False),
    Column("campaign", String(CODE), nullable=False),
    Column("member_id", Integer, nullable=True),
    Column("store", String(CODE), nullable=False),
    Column("terminal", String(8), nullable=False),
    Column("sale", String(24), nullable=False),  # the terminal's sale number ("": its own)
    Column("day", Integer, nullable=False),
    Column("bill_fen", BigInteger, nullable=False),
    Column("discount_fen", BigInteger, nullable=False),
    Column("forfeited_fen", BigInteger, nullable=False),
    Column("store_cost_fen", BigInteger, nullable=False),
    Column("supplier_cost_fen", BigInteger, nullable=False),
    Column("supplier_id", String(CODE), nullable=False),
    # reserved | confirmed (redeemed under another key) | redeemed | released | reversed
    Column("state", String(16), nullable=False),
    Column("created_at_ms", BigInteger, nullable=False),
    Column("updated_at_ms", BigInteger, nullable=False),
    Index(None, "code"),
    Index(None, "campaign", "member_id", "day"),
    Index(None, "terminal", "sale"),
)

coupon_batches = Table(
    "coupon_batches",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("campaign", String(CODE), nullable=False),
    Column("source", String(16), nullable=False),
    Column("count", BigInteger, nullable=False),
    Column("done", BigInteger, nullable=False),
    Column("state", String(16), nullable=False),  # running | done
    Column("created_by", Integer, nullable=False),
    Column("created_at_ms", BigInteger, nullable=False),
    # the idempotency key of an issuance: "<campaign>/<client key>", or a POS reward's
    Column("key", String(KEY), nullable=True, unique=True),
    # SHA-256 (hex) of the request a key was given with (`model.issue_digest`): the same key
    # with another request is refused; NULL on batches made before migration 0017
    Column("request_sha256", String(64), nullable=True),
    Index(None, "campaign"),
)

coupon_signing_keys = Table(
    "coupon_signing_keys",
    metadata,
    Column("kid", String(CODE), primary_key=True),
    Column("legal_entity", String(CODE), nullable=False),
    Column("public_hex", String(64), nullable=False),
    Column("private_sealed", String(256), nullable=False),
    Column("state", String(16), nullable=False),  # active | retired
    Column("created_at_ms", BigInteger, nullable=False),
    Index(None, "legal_entity"),
)

# Members enrolled into a campaign (the campaign card): an `enrolled_only` campaign's instant
# reward goes only to them.
coupon_enrolments = Table(
    "coupon_enrolments",
    metadata,
    Column("campaign", String(CODE), primary_key=True),
    Column("member_id", Integer, primary_key=True),
    Column("enrolled_at_ms", BigInteger, nullable=False),
)


# The column labels of `presented_select`: a table's columns under its prefix.
PRESENTED = (
    ("mine_", coupon_redemptions),
    ("code_", coupon_codes),
    ("campaign_", coupon_campaigns),
)


def presented_select() -> Select[Any]:
    """What a POS coupon request reads, in one statement (`CouponService._read`): the
    redemption stored under the POS key (`key`; a resend), the code a typed text names
    (`code1`, `code2`: its spellings, `candidates`; the first in code order, as `find`
    gives it), that code's campaign, and the member of the card presented (`card`, or
    None). Always one row: a missing part is NULL (labels: `PRESENTED` prefixes and
    `card_member`)."""
    code = (
        select(coupon_codes)
        .where(coupon_codes.c.code.in_([bindparam("code1"), bindparam("code2")]))
        .order_by(coupon_codes.c.code)
        .limit(1)
        .subquery("code")
    )
    campaign = coupon_campaigns.alias("campaign")
    mine = coupon_redemptions.alias("mine")
    card = cards.alias("card")
    anchor = select(literal_column("1").label("one")).subquery("one")
    joined = (
        anchor.outerjoin(code, true())
        .outerjoin(campaign, campaign.c.code == code.c.campaign)
        .outerjoin(mine, mine.c.key == bindparam("key", type_=String))
        .outerjoin(card, card.c.id == bindparam("card", type_=cards.c.id.type))
    )
    parts = {"mine_": mine, "code_": code, "campaign_": campaign}
    columns = [
        parts[prefix].c[c.name].label(prefix + c.name)
        for prefix, table in PRESENTED
        for c in table.c
    ]
    return select(*columns, card.c.member_id.label("card_member")).select_from(joined)


@functools.cache
def presented_many_sql() -> str:
    """PostgreSQL: what `presented_select` reads, for many POS coupon requests in one
    statement (those that ask in one turn of the event loop, `CouponService._read`). $1
    the POS keys, $2 and $3 the spellings of each code, $4 each card's id (NULL: none): one
    array each, one element per request. One row per request, in order, labelled as
    `presented_select`'s (and `n`, the request's place from 1). Only column names and fixed
    words go into the text."""
    labels = ", ".join(
        f"{prefix.rstrip('_')}.{c.name} AS {prefix}{c.name}"
        for prefix, table in PRESENTED
        for c in table.c
    )
    return (
        f"SELECT q.n AS n, {labels}, card.member_id AS card_member"  # noqa: S608
        " FROM unnest($1::varchar[], $2::varchar[], $3::varchar[], $4::bigint[])"
        " WITH ORDINALITY AS q(key, code1, code2, card, n)"
        " LEFT JOIN LATERAL (SELECT * FROM coupon_codes AS c WHERE c.code IN (q.code1, q.code2)"
        " ORDER BY c.code LIMIT 1) AS code ON true"
        " LEFT JOIN coupon_campaigns AS campaign ON campaign.code = code.campaign"
        " LEFT JOIN coupon_redemptions AS mine ON mine.key = q.key"
        " LEFT JOIN cards AS card ON card.id = q.card"
        " ORDER BY q.n"
    )


def _pg_type(column: Column[Any]) -> str:
    """The column's PostgreSQL type without its length: a cast to VARCHAR(n) would cut a
    longer value short, where the column itself refuses it."""
    for kind, name in ((BigInteger, "bigint"), (Integer, "integer"), (String, "varchar")):
        if isinstance(column.type, kind):  # BigInteger before Integer, its base
            return name
    raise TypeError(f"{column.name}: no PostgreSQL type named for {column.type!r}")


@dataclass(frozen=True, slots=True)
class Counted:
    """What a redemption adds to its campaign: the value (against the value budget,
    `budget` fen, 0: none) and the cost by funder; `read_at` is the campaign row's
    `updated_at_ms` the budget was read from (the statement refuses a row changed since)."""

    campaign: str
    budget: int
    read_at: int
    value: int
    store_cost: int
    supplier_cost: int


@dataclass(frozen=True, slots=True)
class Hold:
    """One POS hold of an issued code (`holds_sql`): the code's new values (`version` is
    raised by the statement whatever they say of it), the redemption row, and (a
    redemption) what it adds to its campaign."""

    code_values: dict[str, Any]
    redemption: dict[str, Any]
    counted: Counted | None


def holds_statement(holds: Sequence[Hold]) -> tuple[str, list[Any]]:
    """`holds_sql` and its parameters (one array each) for holds of one shape (the same
    columns set, all counted or none) on distinct codes under distinct keys, one budget
    per campaign."""
    first = holds[0]
    sets = tuple(name for name in first.code_values if name != "version")
    count = first.counted is not None
    for h in holds:
        if tuple(n for n in h.code_values if n != "version") != sets:
            raise ValueError("the holds of one statement set the same columns")
        if (h.counted is not None) != count:
            raise ValueError("the holds of one statement are all counted or none")
        if any(isinstance(h.code_values[name], tuple) for name in sets):
            raise ValueError("the statement raises only `version`; other values are set")
    if len({h.redemption["code"] for h in holds}) < len(holds):
        raise ValueError("the holds of one statement name distinct codes")
    if len({h.redemption["key"] for h in holds}) < len(holds):
        raise ValueError("the holds of one statement have distinct keys")
    budgets = {
        (h.counted.campaign, h.counted.budget, h.counted.read_at)
        for h in holds
        if h.counted is not None
    }
    if len(budgets) > len({campaign for campaign, _, _ in budgets}):
        raise ValueError("the holds of one statement read one budget per campaign")
    args: list[Any] = [[h.redemption["code"] for h in holds]]
    args += [[h.code_values[name] for h in holds] for name in sets]
    args += [[h.redemption[c.name] for h in holds] for c in coupon_redemptions.c]
    if count:
        counted = [h.counted for h in holds if h.counted is not None]
        args += [
            [c.campaign for c in counted], [c.budget for c in counted],
            [c.read_at for c in counted], [c.value for c in counted],
            [c.store_cost for c in counted], [c.supplier_cost for c in counted],
        ]  # fmt: skip
    return holds_sql(sets, count), args


@functools.cache
def holds_sql(code_sets: tuple[str, ...], count: bool) -> str:
    """POS holds of issued codes on PostgreSQL as one statement, its own transaction
    (`CouponService._hold_at_once`, the holds asked in one turn of the event loop): lock
    the codes still issued, in code order; for redemptions (`count`) lock their campaigns
    still active with room in the value budget for all of the statement's redemptions of
    each, in code order; insert the redemption rows (none whose key is stored already);
    and only for the rows that went in, move the codes (`code_sets`: the columns set;
    `version` raised) and raise each campaign's counters by their sums. The code locks
    come first (the campaigns' wait on them), as in the other paths' transactions. Locked
    rows are re-checked on their newest version, so neither update can miss once the row
    is in; but a campaign that did not match in the snapshot the statement began with is
    refused without a look at a newer version (the caller lets a transaction decide then).
    The locks are those of an UPDATE (FOR NO KEY UPDATE). The holds name distinct codes
    under distinct keys, and the redemptions of a campaign one budget (`holds_statement`
    refuses others). One row out per hold, in order, each 0 or 1: `code` (locked),
    `campaign` (locked; as `code` when not counted), `added`.

    Parameters, one array each with one element per hold: $1 the codes, then `code_sets`
    in order, then every redemption column in table order, then (`count`) the campaigns,
    their value budgets (0: none), the `updated_at_ms` each budget was read at (a campaign
    changed since is refused here, and the transaction reads it again), the values and the
    store's and the supplier's costs."""
    # Only parameter numbers, column names and fixed words go into the text.
    n = iter(range(1, 1000))
    typed = [("code", _pg_type(coupon_codes.c.code))]
    typed += [("s_" + name, _pg_type(coupon_codes.c[name])) for name in code_sets]
    typed += [("r_" + c.name, _pg_type(c)) for c in coupon_redemptions.c]
    if count:
        typed += [("c_campaign", "varchar")]
        counters = ("c_budget", "c_read_at", "c_value", "c_store", "c_supplier")
        typed += [(name, "bigint") for name in counters]
    arrays = ", ".join(f"${next(n)}::{kind}[]" for _, kind in typed)
    names = ", ".join(name for name, _ in typed)
    columns = [c.name for c in coupon_redemptions.c]
    sets = ", ".join(f"{name} = q.s_{name}" for name in code_sets)
    campaign = counted = ""
    held = "q.code IN (SELECT code FROM code)"
    if count:
        campaign = (
            "want AS (SELECT q.c_campaign AS campaign, max(q.c_budget) AS budget,"
            " max(q.c_read_at) AS read_at,"
            " sum(q.c_value) AS value FROM q JOIN code ON code.code = q.code"
            " GROUP BY q.c_campaign), "
            "campaign AS (SELECT coupon_campaigns.code FROM coupon_campaigns"
            " JOIN want ON coupon_campaigns.code = want.campaign"
            " WHERE coupon_campaigns.state = 'active'"
            " AND coupon_campaigns.updated_at_ms = want.read_at AND (want.budget = 0"
            " OR coupon_campaigns.redeemed_value + want.value <= want.budget)"
            " ORDER BY coupon_campaigns.code FOR NO KEY UPDATE OF coupon_campaigns), "
        )
        held = "q.c_campaign IN (SELECT code FROM campaign)"
        counted = (
            ", counted AS (UPDATE coupon_campaigns SET"
            " redeemed_count = redeemed_count + a.n, redeemed_value = redeemed_value + a.value,"
            " store_cost = store_cost + a.store, supplier_cost = supplier_cost + a.supplier"
            " FROM (SELECT q.c_campaign AS campaign, count(*) AS n, sum(q.c_value) AS value,"
            " sum(q.c_store) AS store, sum(q.c_supplier) AS supplier"
            " FROM added JOIN q ON q.r_key = added.key GROUP BY q.c_campaign) AS a"
            " WHERE coupon_campaigns.code = a.campaign RETURNING 1)"
        )
    return (
        f"WITH q AS (SELECT * FROM unnest({arrays}) WITH ORDINALITY AS q({names}, n)), "  # noqa: S608
        "code AS (SELECT code FROM coupon_codes WHERE code IN (SELECT q.code FROM q)"
        " AND state = 'issued' ORDER BY code FOR NO KEY UPDATE), "
        f"{campaign}"
        f"added AS (INSERT INTO coupon_redemptions ({', '.join(columns)})"
        f" SELECT {', '.join('q.r_' + c for c in columns)} FROM q"
        f" WHERE q.code IN (SELECT code FROM code) AND {held} ORDER BY q.n"
        " ON CONFLICT (key) DO NOTHING RETURNING key), "
        f"taken AS (UPDATE coupon_codes SET {sets}, version = coupon_codes.version + 1"
        " FROM added JOIN q ON q.r_key = added.key WHERE coupon_codes.code = q.code"
        f" RETURNING 1){counted} "
        "SELECT q.n, (q.code IN (SELECT code FROM code))::int AS code,"
        f" (q.code IN (SELECT code FROM code) AND {held})::int AS campaign,"
        " (q.r_key IN (SELECT key FROM added))::int AS added"
        " FROM q ORDER BY q.n"
    )


def _spend_segment(by_store: bool) -> Select[Any]:
    """The members of an issuance's spend segment, in one statement grouped by the database
    (`CouponService._spend_members`): the active members of a legal entity (`entity`, `state`;
    `by_store`: of the home store `store` too), each holder (card value account) of their
    cards once (a replaced card shares its account with its successor), the holders'
    earnings of the program (`program`) on the local days `first`..`last` (YYYYMMDD), and
    per member the sum of `amount - returned` (the points engine's spend, as its tier basis
    counts it) at least `at_least`; member ids ascending, at most `limit` of them."""
    scope = [
        members.c.legal_entity == bindparam("entity", type_=String),
        members.c.state == bindparam("state", type_=String),
    ]
    if by_store:
        scope.append(members.c.home_store == bindparam("store", type_=String))
    holders = (
        select(cards.c.member_id, cards.c.account_id)
        .select_from(cards.join(members, members.c.id == cards.c.member_id))
        .where(*scope)
        .distinct()
        .subquery("holders")
    )
    e = points_earnings
    spend = func.sum(e.c.amount - e.c.returned)
    joined = holders.join(
        e,
        (e.c.holder == holders.c.account_id)
        & (e.c.program == bindparam("program", type_=String))
        & (e.c.day >= bindparam("first", type_=Integer))
        & (e.c.day <= bindparam("last", type_=Integer)),
    )
    return (
        select(holders.c.member_id)
        .select_from(joined)
        .group_by(holders.c.member_id)
        .having(spend >= bindparam("at_least", type_=BigInteger))
        .order_by(holders.c.member_id)
        .limit(bindparam("limit", type_=Integer))
    )


def _class_segment(by_store: bool) -> Select[Any]:
    """The members of an issuance's card-class segment, each once (`CouponService._members`):
    the active members of a legal entity (`entity`, `state`; `by_store`: of the home store
    `store`) holding an active card of class `class_code` issued by that entity (`by_store`:
    by that store); member ids ascending, at most `limit` of them."""
    where = [
        members.c.legal_entity == bindparam("entity", type_=String),
        members.c.state == bindparam("state", type_=String),
        cards.c.class_code == bindparam("class_code", type_=String),
        cards.c.legal_entity == bindparam("entity", type_=String),
        cards.c.state == bindparam("card_state", type_=String),
    ]
    if by_store:
        where += [
            members.c.home_store == bindparam("store", type_=String),
            cards.c.store == bindparam("store", type_=String),
        ]
    return (
        select(members.c.id.label("member_id"))
        .select_from(cards.join(members, members.c.id == cards.c.member_id))
        .where(*where)
        .distinct()
        .order_by(members.c.id)
        .limit(bindparam("limit", type_=Integer))
    )


def class_segment_select() -> Select[Any]:
    """`_class_segment` over a legal entity's members."""
    return _class_segment(by_store=False)


def class_segment_in_store_select() -> Select[Any]:
    """`_class_segment` over one home store's members and cards."""
    return _class_segment(by_store=True)


def spend_segment_select() -> Select[Any]:
    """`_spend_segment` over a legal entity's members."""
    return _spend_segment(by_store=False)


def spend_segment_in_store_select() -> Select[Any]:
    """`_spend_segment` over one home store's members."""
    return _spend_segment(by_store=True)
