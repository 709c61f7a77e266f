"""Service-card tables (SQLAlchemy Core, on the ledger's MetaData); migration 0005 makes them.

A product is a definition (JSON the pure model reads); a sale is an entitlement row on a
card holder (the card's value account id, shared by a replacement card) whose remaining
uses move by guarded updates (`take_uses`, `give_back_uses`: the database decides, never a
value read before); each POS redemption is recorded under its POS key with the uses left
after it, so a resend gets the same answer and a reversal finds it.
"""

from sqlalchemy import BigInteger, Boolean, Column, Index, Integer, String, Table, Text, update
from sqlalchemy.ext.asyncio import AsyncConnection

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


async def take_uses(conn: AsyncConnection, entitlement_id: int, uses: int, *, now_ms: int) -> int:
    """Take `uses` entitlements of an active, unexpired package that has at least that many
    left, in one guarded UPDATE (two terminals taking the last use: one row changes, the
    other none). How many rows changed (0 or 1)."""
    t = service_entitlements
    result = await conn.execute(
        update(t)
        .where(
            t.c.id == entitlement_id,
            t.c.state == "active",
            t.c.uses_left >= uses,
            t.c.expires_ms > now_ms,
        )
        .values(uses_left=t.c.uses_left - uses, updated_at_ms=now_ms)
    )
    return int(result.rowcount)


async def give_back_uses(
    conn: AsyncConnection, entitlement_id: int, uses: int, *, now_ms: int
) -> int:
    """Give back `uses` entitlements (a reversed redemption), never past the package's
    total. How many rows changed (0 or 1)."""
    t = service_entitlements
    result = await conn.execute(
        update(t)
        .where(t.c.id == entitlement_id, t.c.uses_left + uses <= t.c.uses_total)
        .values(uses_left=t.c.uses_left + uses, updated_at_ms=now_ms)
    )
    return int(result.rowcount)
