"""The ledger's tables (SQLAlchemy Core). The migrations in `migrations/versions` create them;
`tests/integration/test_schema.py` proves the two agree.

Append-only (the database refuses UPDATE and DELETE by trigger): batches, assets,
account_events, transfers, entries, failures. Mutable, and written only by the writer:
accounts (balances and flags), open_holds (the working set of unresolved holds), outbox.
"""

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)

from cardcore import limits

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

NAME = limits.NAME_CHARS_MAX

batches = Table(
    "ledger_batches",
    metadata,
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False, unique=True),
    Column("ops", Integer, nullable=False),
    Column("committed_at_ms", BigInteger, nullable=False),
)

assets = Table(
    "ledger_assets",
    metadata,
    Column("code", String(limits.ASSET_CODE_CHARS_MAX), primary_key=True),
    Column("kind", String(16), nullable=False),
    Column("scale", SmallInteger, nullable=False),
    Column("name", String(NAME), nullable=False),
    Column("seq", BigInteger, nullable=False),
)

_BALANCE_CHECKS = (
    CheckConstraint(
        "debits_posted >= 0 AND credits_posted >= 0"
        " AND debits_pending >= 0 AND credits_pending >= 0",
        name="balances_not_negative",
    ),
    CheckConstraint(
        "NOT no_overdraft OR debits_posted + debits_pending <= credits_posted",
        name="no_overdraft",
    ),
    CheckConstraint(
        "NOT no_overcredit OR credits_posted + credits_pending <= debits_posted",
        name="no_overcredit",
    ),
)

accounts = Table(
    "ledger_accounts",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=False),
    Column("natural_key", String(5 * NAME + 8), nullable=False, unique=True),
    Column("asset", ForeignKey("ledger_assets.code"), nullable=False),
    Column("legal_entity", String(NAME), nullable=False),
    Column("owner_kind", String(NAME), nullable=False),
    Column("owner_id", String(NAME), nullable=False),
    Column("purpose", String(NAME), nullable=False),
    Column("no_overdraft", Boolean, nullable=False),
    Column("no_overcredit", Boolean, nullable=False),
    Column("debit_frozen", Boolean, nullable=False),
    Column("credit_frozen", Boolean, nullable=False),
    Column("debits_posted", BigInteger, nullable=False),
    Column("credits_posted", BigInteger, nullable=False),
    Column("debits_pending", BigInteger, nullable=False),
    Column("credits_pending", BigInteger, nullable=False),
    Column("version", BigInteger, nullable=False),
    Column("created_seq", BigInteger, nullable=False),
    *_BALANCE_CHECKS,
    Index(None, "legal_entity", "owner_kind", "owner_id"),
    Index(None, "owner_kind", "owner_id", "asset"),  # a points holder's lots (migration 0006)
    Index(None, "asset", "owner_kind", "owner_id", "id"),  # the expiry job's pages (0020)
)

account_events = Table(
    "ledger_account_events",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=False),
    Column("seq", BigInteger, nullable=False, index=True),
    Column("kind", String(16), nullable=False),
    Column("account_id", BigInteger, nullable=False),
    Column("asset", String(limits.ASSET_CODE_CHARS_MAX), nullable=False),
    Column("legal_entity", String(NAME), nullable=False),
    Column("owner_kind", String(NAME), nullable=False),
    Column("owner_id", String(NAME), nullable=False),
    Column("purpose", String(NAME), nullable=False),
    Column("no_overdraft", Boolean, nullable=False),
    Column("no_overcredit", Boolean, nullable=False),
    Column("debit_frozen", Boolean, nullable=False),
    Column("credit_frozen", Boolean, nullable=False),
)

transfers = Table(
    "ledger_transfers",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=False),
    Column("client", String(limits.CLIENT_CHARS_MAX), nullable=False),
    Column("key", String(limits.KEY_CHARS_MAX), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("asset", String(limits.ASSET_CODE_CHARS_MAX), nullable=False),
    Column("postings", Text, nullable=False),
    Column("pending_id", BigInteger, nullable=True, unique=True),  # a hold resolves once
    Column("timeout_s", Integer, nullable=True),
    Column("expires_at_ms", BigInteger, nullable=True),
    Column("reason", String(limits.REASON_CHARS_MAX), nullable=False),
    Column("metadata", Text, nullable=False),
    Column("seq", BigInteger, nullable=False, index=True),
    Column("created_at_ms", BigInteger, nullable=False),
    # reverse and refund: the transfer given back (migration 0002). A transfer is reversed
    # at most once: the partial unique index below makes the database hold that too.
    Column("target_id", BigInteger, nullable=True, index=True),
    UniqueConstraint("client", "key"),
    Index(
        "uq_ledger_transfers_reversed_once",
        "target_id",
        unique=True,
        sqlite_where=text("kind = 'reverse'"),
        postgresql_where=text("kind = 'reverse'"),
    ),
)

entries = Table(
    "ledger_entries",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=False),
    Column("seq", BigInteger, nullable=False, index=True),
    Column("transfer_id", BigInteger, nullable=False),
    Column("account_id", BigInteger, nullable=False),
    Column("side", String(8), nullable=False),
    Column("posted_delta", BigInteger, nullable=False),
    Column("pending_delta", BigInteger, nullable=False),
    Column("debits_posted", BigInteger, nullable=False),
    Column("credits_posted", BigInteger, nullable=False),
    Column("debits_pending", BigInteger, nullable=False),
    Column("credits_pending", BigInteger, nullable=False),
    Column("version", BigInteger, nullable=False),
    Index(None, "account_id", "id"),
)

failures = Table(
    "ledger_failures",
    metadata,
    Column("client", String(limits.CLIENT_CHARS_MAX), primary_key=True),
    Column("key", String(limits.KEY_CHARS_MAX), primary_key=True),
    Column("request", Text, nullable=False),
    Column("code", String(64), nullable=False),
    Column("field", String(128), nullable=True),
    Column("seq", BigInteger, nullable=False, index=True),
    Column("created_at_ms", BigInteger, nullable=False),
)

open_holds = Table(
    "ledger_open_holds",
    metadata,
    Column("transfer_id", BigInteger, primary_key=True, autoincrement=False),
    Column("expires_at_ms", BigInteger, nullable=True, index=True),
)

outbox = Table(
    "ledger_outbox",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=False),
    Column("seq", BigInteger, nullable=False),
    Column("event", String(32), nullable=False),
    Column("transfer_id", BigInteger, nullable=False),
)

JOURNAL_TABLES = {
    "assets": assets,
    "account_events": account_events,
    "transfers": transfers,
    "entries": entries,
    "failures": failures,
}
APPEND_ONLY_TABLES = (batches, *JOURNAL_TABLES.values())
