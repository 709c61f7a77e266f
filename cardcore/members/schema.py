"""Member tables (SQLAlchemy Core, on the ledger's MetaData); migration 0004 makes them.

The ID document is kept as a keyed hash (lookup) and AES-GCM ciphertext, never in clear.
`member_consents` is the append-only history of every SMS consent given or withdrawn.
"""

from sqlalchemy import BigInteger, Boolean, Column, Integer, String, Table, Text

from cardcore import limits
from cardcore.ledger.schema import metadata

CODE = 32

members = Table(
    "members",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("mobile", String(20), nullable=True, unique=True),  # None once merged or deleted
    Column("name", String(limits.MEMBER_NAME_CHARS_MAX), nullable=False),
    Column("gender", String(1), nullable=False),
    Column("birthday", String(10), nullable=False),
    Column("id_type", String(16), nullable=False),
    Column("id_hash", String(64), nullable=True, index=True),
    Column("id_sealed", String(256), nullable=False),
    Column("id_masked", String(32), nullable=False),
    Column("email", String(limits.EMAIL_CHARS_MAX), nullable=False),
    Column("sms_alerts", Boolean, nullable=False),
    Column("sms_marketing", Boolean, nullable=False),
    Column("tier", String(CODE), nullable=False),
    Column("home_store", String(CODE), nullable=False, index=True),
    Column("legal_entity", String(CODE), nullable=False),
    Column("state", String(16), nullable=False),
    Column("merged_into", Integer, nullable=True),
    Column("created_at_ms", BigInteger, nullable=False),
    Column("updated_at_ms", BigInteger, nullable=False),
)

member_consents = Table(
    "member_consents",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("member_id", Integer, nullable=False, index=True),
    Column("purpose", String(16), nullable=False),  # "alerts" | "marketing"
    Column("granted", Boolean, nullable=False),
    Column("source", String(32), nullable=False),  # "counter", "sms", "app", "import", ...
    Column("at_ms", BigInteger, nullable=False),
    Column("user_id", Integer, nullable=False),  # the staff user who recorded it
)

APPEND_ONLY = ("member_consents",)

# The outbox of what members are to be told (points expiring, points expired, ...): the SMS
# bus reads unsent rows, sends them (consent permitting) and marks them sent. `key` makes a
# notice idempotent: a job run twice writes each notice once.
member_notices = Table(
    "member_notices",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("key", String(160), nullable=False, unique=True),
    Column("kind", String(CODE), nullable=False),
    Column("member_id", Integer, nullable=True, index=True),
    Column("holder", BigInteger, nullable=True),
    Column("payload", Text, nullable=False),  # JSON: what the message says
    Column("created_at_ms", BigInteger, nullable=False),
    Column("sent_at_ms", BigInteger, nullable=True, index=True),
)
