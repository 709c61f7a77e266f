"""E-coupon tables (SQLAlchemy Core, on the ledger's MetaData); migration 0005 makes them.

A code's life is one row whose state moves by guarded updates (`issued -> reserved ->
redeemed`, back by release or reversal), so two terminals racing for one code meet in the
database: exactly one update matches. Redemptions are recorded per POS key with their cost
by funder (supplier settlement reads them). Signing keys: one Ed25519 key pair per issuing
legal entity and key id, the private half sealed by the vault.
"""

import functools
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
    literal_column,
    select,
    true,
)

from cardcore import limits
from cardcore.cards.schema import cards
from cardcore.ledger.schema import metadata

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
    Index(None, "campaign", "state"),
    Index(None, "member_id"),
    Index(None, "batch"),
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
    `budget` fen, 0: none) and the cost by funder."""

    campaign: str
    budget: int
    value: int
    store_cost: int
    supplier_cost: int


def hold_statement(
    code_values: dict[str, Any], redemption: dict[str, Any], counted: Counted | None
) -> tuple[str, list[Any]]:
    """`hold_sql` and its parameters: the code's new values (`version` is raised by the
    statement whatever `code_values` says of it), the redemption row, and (a redemption)
    what it adds to its campaign."""
    sets = tuple(name for name in code_values if name != "version")
    if any(isinstance(code_values[name], tuple) for name in sets):
        raise ValueError("the statement raises only `version`; other values are set")
    args = [redemption["code"], *(code_values[name] for name in sets)]
    args += [redemption[c.name] for c in coupon_redemptions.c]
    if counted is not None:
        args += [counted.campaign, counted.budget, counted.value, counted.store_cost,
                 counted.supplier_cost]  # fmt: skip
    return hold_sql(sets, counted is not None), args


@functools.cache
def hold_sql(code_sets: tuple[str, ...], count: bool) -> str:
    """A POS hold of an issued code on PostgreSQL as one statement, its own transaction
    (`CouponService._hold_at_once`): lock the code while it is still issued; for a
    redemption (`count`) lock its campaign while active with room in its value budget;
    insert the redemption row (nothing when its key is stored already); and only when it
    went in, move the code (`code_sets`: the columns set; `version` raised) and raise the
    campaign's counters. The code lock comes first (the campaign's waits on it, a one-time
    filter), as in the other paths' transactions. Locked rows are re-checked on their
    newest version, so neither update can miss once the row is in; but a campaign that did
    not match in the snapshot the statement began with is refused without a look at a
    newer version (the caller lets a transaction decide then). The locks are those of an
    UPDATE (FOR NO KEY UPDATE). One row out, each 0 or 1: `code` (locked), `campaign`
    (locked; 1 when not counted), `added`.

    Parameters: $1 the code, then `code_sets` in order, then every redemption column in
    table order, then (`count`) the campaign, its value budget (0: none), the value and
    the store's and the supplier's cost."""
    # Only parameter numbers, column names and fixed words go into the text.
    n = iter(range(1, 1000))
    code = f"${next(n)}::{_pg_type(coupon_codes.c.code)}"
    sets = ", ".join(f"{name} = ${next(n)}::{_pg_type(coupon_codes.c[name])}" for name in code_sets)
    columns = list(coupon_redemptions.c)
    values = ", ".join(f"${next(n)}::{_pg_type(c)}" for c in columns)
    campaign = counted = ""
    if count:
        c, budget, value, store, supplier = (f"${next(n)}" for _ in range(5))
        campaign = (
            f"campaign AS (SELECT code FROM coupon_campaigns WHERE code = {c}::varchar"  # noqa: S608
            " AND EXISTS (SELECT FROM code) AND state = 'active'"
            f" AND ({budget}::bigint = 0 OR redeemed_value + {value}::bigint <= {budget}::bigint)"
            " FOR NO KEY UPDATE), "
        )
        counted = (
            ", counted AS (UPDATE coupon_campaigns SET redeemed_count = redeemed_count + 1,"  # noqa: S608
            f" redeemed_value = redeemed_value + {value}::bigint,"
            f" store_cost = store_cost + {store}::bigint,"
            f" supplier_cost = supplier_cost + {supplier}::bigint"
            f" FROM added WHERE coupon_campaigns.code = {c}::varchar RETURNING 1)"
        )
    held = "campaign" if count else "code"
    return (
        f"WITH code AS (SELECT code FROM coupon_codes WHERE code = {code}"  # noqa: S608
        f" AND state = 'issued' FOR NO KEY UPDATE), {campaign}"
        f"added AS (INSERT INTO coupon_redemptions ({', '.join(c.name for c in columns)})"
        f" SELECT {values} WHERE EXISTS (SELECT FROM {held})"
        " ON CONFLICT (key) DO NOTHING RETURNING key), "
        f"taken AS (UPDATE coupon_codes SET {sets}, version = coupon_codes.version + 1"
        f" FROM added WHERE coupon_codes.code = {code} RETURNING 1){counted} "
        "SELECT (SELECT count(*) FROM code) AS code,"
        f" (SELECT count(*) FROM {held}) AS campaign, (SELECT count(*) FROM added) AS added"
    )
