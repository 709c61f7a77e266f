"""Service packages keep the stores of their sale: where a package may be redeemed, the
product's `stores` on the day it was sold, as a column of `service_entitlements` (a JSON list
of store codes, sorted; [] = every store). The uses sold, the expiry, the price paid (0005)
and the refund terms (0007) were kept already: with this, no term of a package is read from
its product at a use or a refund.

Before 0009 a redemption read the product's stores of the day, so narrowing a product to
fewer stores refused packages already sold in the stores dropped. Packages sold before 0009
get their product's current stores: the best there is, as the stores of their day were not
kept (and what their redemptions read until now). A package whose product is gone (none is
ever deleted) gets the store that sold it, where its product was redeemable at its sale.

The column is nullable and has no default: NULL means "not recorded", and a package reads
its product's stores at each use then, as code older than 0009 did. Code older than 0009
keeps running during a rolling upgrade and sells packages without the column: they are
accepted, NULL. While this revision runs its sales wait: the column's addition locks the
table until the revision commits (each revision commits on its own, migrations/env.py), and
a sale that waits past the lock timeout fails cleanly (its money undone). Those after stay
NULL, redeemable where their product is, never wider. (This revision first added the column
NOT NULL: those sales failed after it. 0012 drops NOT NULL where that ran: both paths end
the same.) Code from 0009 on writes the column at every sale.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-25
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLE = "service_entitlements"
BACKFILL_ROWS = 10_000  # packages filled per statement (by primary key range)
# The new column: NULL until filled (and for good in packages sold by older code meanwhile).
COLUMNS = (("stores", sa.Text()),)

# The product's stores, from its definition (JSON text), else the selling store: one
# statement per dialect.
FILL_POSTGRESQL = """
UPDATE service_entitlements AS e SET
    stores = coalesce(
        (SELECT (p.definition::jsonb -> 'stores')::text FROM service_products AS p
         WHERE p.code = e.product),
        jsonb_build_array(e.store)::text)
WHERE e.id >= :low AND e.id < :high
"""
FILL_SQLITE = """
UPDATE service_entitlements SET
    stores = coalesce(
        (SELECT json_extract(p.definition, '$.stores') FROM service_products AS p
         WHERE p.code = service_entitlements.product),
        json_array(service_entitlements.store))
WHERE id >= :low AND id < :high
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
            bind.execute(fill, {"low": start, "high": start + BACKFILL_ROWS})


def downgrade() -> None:
    with op.batch_alter_table(TABLE) as batch:
        for name, _ in COLUMNS:
            batch.drop_column(name)
