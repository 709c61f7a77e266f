"""Service-card tables (SQLAlchemy Core, on the ledger's MetaData); migration 0005 makes them,
0007 adds the refund terms a package keeps, 0009 the stores where it may be redeemed (0014
and 0012: NULL when a sale by older code did not record them).

A product is a definition (JSON the pure model reads); a sale is an entitlement row on a
card holder (the card's value account id, shared by a replacement card) that keeps the terms
of the day of the sale (the uses sold, the expiry, the price paid, the product's redeemable
stores and its refund terms: a use or a refund never reads the product, except for the
terms a package sold by code older than 0009 or 0007 did not record), and whose remaining
uses move by guarded updates (the service's `records` updates with `at_least` and `at_most`:
the database decides, never a value read before); each POS redemption is recorded under its
POS key with the uses left after it, so a resend gets the same answer and a reversal finds
it.
"""

from sqlalchemy import BigInteger, Boolean, Column, Index, Integer, String, Table, Text

from cardcore import limits
from cardcore.ledger.schema import metadata

CODE = 32
NAME = limits.NAME_CHARS_MAX
KEY = 160

service_products = Table(
    "service_products",
    metadata,
    Column("code", String(CODE), primary_key=True),
    Column("name", String(NAME), nullable=False),
    Column("legal_entity", String(CODE), nullable=False),
    Column("definition", Text, nullable=False),
    Column("state", String(16), nullable=False),  # active | retired
    Column("created_at_ms", BigInteger, nullable=False),
    Column("updated_at_ms", BigInteger, nullable=False),
)

service_entitlements = Table(
    "service_entitlements",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("product", String(CODE), nullable=False),
    Column("holder", BigInteger, nullable=False),
    Column("member_id", Integer, nullable=True),
    Column("store", String(CODE), nullable=False),  # where it was sold
    Column("uses_total", Integer, nullable=False),
    Column("uses_left", Integer, nullable=False),
    Column("price_fen", BigInteger, nullable=False),
    # The product's refund terms when it was sold (refunds use them, never today's). NULL =
    # not recorded (sold by code older than 0007, which writes none of the four): the
    # product's four terms, read at each use and refund, as that code did (any one NULL: all
    # four). Sales write all four.
    Column("refund_policy", String(CODE), nullable=True),
    Column("refund_fee_fen", BigInteger, nullable=True),
    Column("single_use_price_fen", BigInteger, nullable=True),
    Column("refund_after_expiry", Boolean, nullable=True),
    # The product's stores when it was sold, where it may be redeemed (never today's): a JSON
    # list of store codes, sorted; [] = every store. NULL = not recorded (sold by code older
    # than 0009): the product's stores, read at each use, as that code did. Sales write it.
    Column("stores", Text, nullable=True),
    Column("sold_ms", BigInteger, nullable=False),
    Column("expires_ms", BigInteger, nullable=False),
    Column("state", String(16), nullable=False),
    Column("sale_key", String(KEY), nullable=False, unique=True),
    Column("refund_key", String(KEY), nullable=True),
    Column("refunded_fen", BigInteger, nullable=False),
    Column("updated_at_ms", BigInteger, nullable=False),
    Index(None, "holder"),
)

service_redemptions = Table(
    "service_redemptions",
    metadata,
    Column("key", String(KEY), primary_key=True),
    Column("entitlement", Integer, nullable=False),
    Column("uses", Integer, nullable=False),
    Column("uses_left_after", Integer, nullable=False),
    Column("store", String(CODE), nullable=False),
    Column("terminal", String(8), nullable=False),
    Column("reversed", Boolean, nullable=False),
    Column("created_at_ms", BigInteger, nullable=False),
    Index(None, "entitlement"),
)
