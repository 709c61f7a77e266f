"""Organization tables (SQLAlchemy Core, on the ledger's MetaData); migration 0004 makes them.

`audit_log` is append-only: triggers refuse UPDATE and DELETE, as on the ledger's journal.
"""

from sqlalchemy import BigInteger, Column, Index, Integer, String, Table, Text

from cardcore import limits
from cardcore.ledger.schema import metadata

NAME = limits.NAME_CHARS_MAX
CODE = 32

legal_entities = Table(
    "org_legal_entities",
    metadata,
    Column("id", String(CODE), primary_key=True),
    Column("name", String(NAME), nullable=False),
    Column("created_at_ms", BigInteger, nullable=False),
)

stores = Table(
    "org_stores",
    metadata,
    Column("id", String(CODE), primary_key=True),
    Column("legal_entity", String(CODE), nullable=False, index=True),
    Column("name", String(NAME), nullable=False),
    Column("region", String(NAME), nullable=False),
    Column("city", String(NAME), nullable=False),
    Column("state", String(16), nullable=False),
    Column("created_at_ms", BigInteger, nullable=False),
)

staff_users = Table(
    "org_staff_users",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(CODE), nullable=False, unique=True),
    Column("role", String(32), nullable=False),
    Column("scope_kind", String(16), nullable=False),
    Column("scope_id", String(CODE), nullable=False),
    Column("scope_entity", String(CODE), nullable=False),
    Column("state", String(16), nullable=False),
    Column("created_at_ms", BigInteger, nullable=False),
)

api_tokens = Table(
    "org_api_tokens",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("user_id", Integer, nullable=False, index=True),
    Column("secret_hash", String(64), nullable=False, unique=True),
    Column("label", String(NAME), nullable=False),
    Column("created_at_ms", BigInteger, nullable=False),
    Column("expires_at_ms", BigInteger, nullable=False),
    Column("revoked_at_ms", BigInteger, nullable=True),
)

grants = Table(
    "org_grants",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("store", String(CODE), nullable=False, index=True),
    Column("function", String(16), nullable=False),
    Column("product", String(CODE), nullable=False),
    Column("budget_count", BigInteger, nullable=True),
    Column("budget_amount", BigInteger, nullable=True),
    Column("used_count", BigInteger, nullable=False),
    Column("used_amount", BigInteger, nullable=False),
    Column("valid_from", String(10), nullable=False),
    Column("valid_to", String(10), nullable=False),
    Column("state", String(16), nullable=False),
    Column("created_at_ms", BigInteger, nullable=False),
)

audit_log = Table(
    "org_audit_log",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at_ms", BigInteger, nullable=False),
    Column("user_id", Integer, nullable=False),
    Column("user", String(CODE), nullable=False),
    Column("token_id", Integer, nullable=False),
    Column("role", String(32), nullable=False),
    Column("action", String(NAME), nullable=False),
    Column("object_kind", String(32), nullable=False),
    Column("object_id", String(NAME), nullable=False),
    Column("entity", String(CODE), nullable=False),
    Column("store", String(CODE), nullable=False),
    Column("before", Text, nullable=True),
    Column("after", Text, nullable=True),
    Index(None, "object_kind", "object_id"),
    Index(None, "entity", "store"),
)

APPEND_ONLY = ("org_audit_log",)


vault_keys = Table(  # migration 0019: the KEK's check value (`migrate.check_kek`)
    "vault_keys",
    metadata,
    Column("name", String(16), primary_key=True),
    Column("check_value", String(32), nullable=False),
    Column("created_at_ms", BigInteger, nullable=False),
)
