"""E-coupon tables (SQLAlchemy Core, on the ledger's MetaData); migration 0005 makes them.

A code's life is one row whose state moves by guarded updates (`issued -> reserved ->
redeemed`, back by release or reversal), so two terminals racing for one code meet in the
database: exactly one update matches. Redemptions are recorded per POS key with their cost
by funder (supplier settlement reads them). Signing keys: one Ed25519 key pair per issuing
legal entity and key id, the private half sealed by the vault.
"""

from sqlalchemy import BigInteger, Column, Index, Integer, String, Table, Text

from cardcore import limits
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
