"""Service packages keep the refund terms of their sale: the product's refund policy, refund
fee, one-use list price and whether it refunds after expiry, as four columns of
`service_entitlements` (the price paid and the uses sold were kept already).

Before 0007 a refund read the product's terms of the day, so a later change of the product
applied to packages already sold. Packages sold before 0007 get their product's current terms:
the best there is, as the terms of their day were not kept. A package whose product is gone
(none is ever deleted) gets no refund (policy `none`, no fee, no list price, not after
expiry).

The columns are nullable and have no default: NULL means "not recorded", and a package is
refunded by its product's terms as they are at the refund then, as code older than 0007 did
(its product gone: no refund, as above). Code older than 0007 keeps running during a rolling
upgrade and sells packages without the columns: they are accepted, NULL. While this revision
runs its sales wait: the column's addition locks the table until the revision commits (each
revision commits on its own, migrations/env.py), and a sale that waits past the lock timeout
fails cleanly (its money undone). Those after stay NULL, refunded by their product's terms.
(This revision first added the columns NOT NULL: those sales failed after it. 0014 drops NOT
NULL where that ran: both paths end the same.) Code from 0007 on writes all four at every
sale.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-24
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLE = "service_entitlements"
CODE = 32
BACKFILL_ROWS = 10_000  # packages filled per statement (by primary key range)
# The new columns: NULL until filled (and for good in packages sold by older code meanwhile).
COLUMNS = (
    ("refund_policy", sa.String(CODE)),
    ("refund_fee_fen", sa.BigInteger()),
    ("single_use_price_fen", sa.BigInteger()),
    ("refund_after_expiry", sa.Boolean()),
)

# The product's terms, from its definition (JSON text): one statement per dialect.
FILL_POSTGRESQL = """
UPDATE service_entitlements AS e SET
    refund_policy = p.definition::jsonb ->> 'refund_policy',
    refund_fee_fen = (p.definition::jsonb ->> 'refund_fee_fen')::bigint,
    single_use_price_fen = (p.definition::jsonb ->> 'single_use_price_fen')::bigint,
    refund_after_expiry = (p.definition::jsonb ->> 'refund_after_expiry')::boolean
FROM service_products AS p
WHERE p.code = e.product AND e.id >= :low AND e.id < :high
"""
_TERM = "(SELECT json_extract(p.definition, '$.{}') FROM service_products AS p "
_TERM += "WHERE p.code = service_entitlements.product)"
FILL_SQLITE = f"""
UPDATE service_entitlements SET
    refund_policy = {_TERM.format("refund_policy")},
    refund_fee_fen = {_TERM.format("refund_fee_fen")},
    single_use_price_fen = {_TERM.format("single_use_price_fen")},
    refund_after_expiry = {_TERM.format("refund_after_expiry")}
WHERE id >= :low AND id < :high
  AND product IN (SELECT code FROM service_products)
"""  # noqa: S608 - fixed text, the bounds are parameters
# No refund for a package whose product is gone (what the defaults once gave): both dialects.
FILL_GONE = """
UPDATE service_entitlements SET
    refund_policy = 'none', refund_fee_fen = 0, single_use_price_fen = 0,
    refund_after_expiry = FALSE
WHERE id >= :low AND id < :high
  AND product NOT IN (SELECT code FROM service_products)
"""


def upgrade() -> None:
    with op.batch_alter_table(TABLE) as batch:
        for name, type_ in COLUMNS:
            batch.add_column(sa.Column(name, type_, nullable=True))
    bind = op.get_bind()
    fill = sa.text(FILL_POSTGRESQL if bind.dialect.name == "postgresql" else FILL_SQLITE)
    low, high = bind.execute(sa.text(f"SELECT min(id), max(id) FROM {TABLE}")).one()  # noqa: S608
    if low is not None:
        for start in range(low, high + 1, BACKFILL_ROWS):
            bounds = {"low": start, "high": min(start + BACKFILL_ROWS, high + 1)}
            bind.execute(fill, bounds)
            bind.execute(sa.text(FILL_GONE), bounds)


def downgrade() -> None:
    with op.batch_alter_table(TABLE) as batch:
        for name, _ in COLUMNS:
            batch.drop_column(name)
