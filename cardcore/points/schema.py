"""Points tables (SQLAlchemy Core, on the ledger's MetaData); migration 0005 makes them.

The points themselves are ledger facts (ADR 0007): lots are ledger accounts, earnings,
spends, clawbacks and expiries are ledger transfers. These tables hold what the ledger does
not: program and rule definitions (JSON the pure model reads), the earning pinned under its
ledger key before it posts (with its per-rule parts, which the daily caps count), the
clawbacks of returns, transfers between members (their daily limits), and each holder's tier.
`holder_accounts_select` is the expiry job's read of the lot accounts.
"""

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
    UniqueConstraint,
    bindparam,
    select,
    tuple_,
)

from cardcore import limits
from cardcore.ledger.schema import accounts, metadata

CODE = 32
NAME = limits.NAME_CHARS_MAX
KEY = 160  # a ledger idempotency key

points_programs = Table(
    "points_programs",
    metadata,
    Column("code", String(CODE), primary_key=True),
    Column("name", String(NAME), nullable=False),
    Column("asset", String(limits.ASSET_CODE_CHARS_MAX), nullable=False, unique=True),  # its points
    Column("definition", Text, nullable=False),  # model.program_json + tiers (JSON)
    Column("state", String(16), nullable=False),  # active | closed
    Column("created_at_ms", BigInteger, nullable=False),
    Column("updated_at_ms", BigInteger, nullable=False),
)

points_rules = Table(
    "points_rules",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("program", String(CODE), nullable=False),
    Column("code", String(CODE), nullable=False),
    Column("legal_entity", String(CODE), nullable=False),  # "" = the group's
    Column("store", String(CODE), nullable=False),  # "" = not one store's own rule
    Column("definition", Text, nullable=False),  # model.rule_json (JSON)
    Column("state", String(16), nullable=False),  # active | retired
    Column("created_at_ms", BigInteger, nullable=False),
    Column("updated_at_ms", BigInteger, nullable=False),
    UniqueConstraint("program", "code"),
)

points_earnings = Table(
    "points_earnings",
    metadata,
    Column("key", String(KEY), primary_key=True),  # the ledger key of the earning transfer
    Column("holder", BigInteger, nullable=False),  # the card's value account id
    Column("program", String(CODE), nullable=False),
    Column("day", Integer, nullable=False),  # localtime.day_number in the program's zone
    Column("points", BigInteger, nullable=False),  # earned (before debt repayment)
    Column("debt_repaid", BigInteger, nullable=False),
    Column("amount", BigInteger, nullable=False),  # fen the points were earned on
    Column("returned", BigInteger, nullable=False),  # fen returned since (clawbacks)
    Column("clawed", BigInteger, nullable=False),  # points clawed back since
    Column("lot", String(64), nullable=False),  # the lot account's purpose
    Column("store", String(CODE), nullable=False),
    Column("source", String(160), nullable=False),  # the purchase's ledger key, or ""
    Column("created_at_ms", BigInteger, nullable=False),
    Index(None, "holder", "day"),
    Index(None, "source"),
)

points_earning_parts = Table(
    "points_earning_parts",
    metadata,
    Column("key", String(KEY), primary_key=True),
    Column("rule", String(CODE), primary_key=True),
    Column("holder", BigInteger, nullable=False),
    Column("day", Integer, nullable=False),
    Column("points", BigInteger, nullable=False),
    Index(None, "holder", "rule", "day"),
)

points_clawbacks = Table(
    "points_clawbacks",
    metadata,
    Column("key", String(KEY), primary_key=True),  # the ledger key of the clawback transfer
    Column("earning", String(KEY), nullable=False),
    Column("returned", BigInteger, nullable=False),  # fen of this return
    Column("points", BigInteger, nullable=False),  # taken from lots
    Column("debt", BigInteger, nullable=False),  # recorded as debt (shortfall)
    Column("created_at_ms", BigInteger, nullable=False),
    Index(None, "earning"),
)

points_transfers = Table(
    "points_transfers",
    metadata,
    Column("key", String(KEY), primary_key=True),
    Column("program", String(CODE), nullable=False),
    Column("from_holder", BigInteger, nullable=False),
    Column("to_holder", BigInteger, nullable=False),
    Column("day", Integer, nullable=False),
    Column("points", BigInteger, nullable=False),
    Column("created_at_ms", BigInteger, nullable=False),
    Index(None, "from_holder", "day"),
)

points_holders = Table(
    "points_holders",
    metadata,
    Column("holder", BigInteger, primary_key=True),
    Column("program", String(CODE), primary_key=True),
    Column("tier", String(CODE), nullable=False),  # "" = no tier
    Column("tier_since_ms", BigInteger, nullable=False),
    Column("updated_at_ms", BigInteger, nullable=False),
)


def holder_accounts_select() -> Select[Any]:
    """A page of one asset's accounts of one owner kind (`asset`, `owner_kind`) in (owner id,
    account id) order, after the cursor (`holder`, `after`), at most `limit`: the points
    expiry job's read, which meets each holder's lots one after the other, whatever the
    database's collation (equal owner ids are always together) and however many pages they
    span. One range read of the index on (asset, owner_kind, owner_id, id) (migration 0020)
    per page."""
    a = accounts
    cursor = tuple_(bindparam("holder", type_=String), bindparam("after", type_=BigInteger))
    return (
        select(a)
        .where(
            a.c.asset == bindparam("asset", type_=String),
            a.c.owner_kind == bindparam("owner_kind", type_=String),
            tuple_(a.c.owner_id, a.c.id) > cursor,
        )
        .order_by(a.c.owner_id, a.c.id)
        .limit(bindparam("limit", type_=Integer))
    )
