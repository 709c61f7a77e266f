"""A service package's stores may be unrecorded: `service_entitlements.stores` loses NOT NULL.

0009 first added the column NOT NULL (with the default '[]', every store, until filled),
which broke the code still running during a rolling upgrade: code older than 0009 sells
packages without the column, and after 0009 such a sale failed (its money undone,
`service_sale_undone`), while one during 0009's fill got '[]' and was redeemable in every
store, wider than its product allowed. NULL now means "not recorded": the package is
redeemable in its product's stores as they are at each use (what code older than 0009
read), so an older sale is accepted and redeems where its product does. Code that sells
writes the column at every sale, as before. 0009 now adds the column nullable; on a
database where it ran the first way, this drops NOT NULL, so both end the same.

Code of the releases from 0009 to 0011 (before this) cannot read a NULL: a database
left there with packages sold meanwhile by code older than 0009 needs this revision
before that code serves again.

Downgrade: the packages left NULL get their product's stores as they are, else the store
that sold them (as 0009 fills), in batches by id; then the column is NOT NULL again.

Timeouts: migrations/env.py sets the lock and statement timeouts of every migration on
PostgreSQL; dropping NOT NULL changes the catalogue only (no table scan).

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-26
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLE = "service_entitlements"
COLUMN = "stores"
BACKFILL_ROWS = 10_000  # packages filled per statement (by primary key range)

# The product's stores, from its definition (JSON text), else the selling store, for the
# packages without any (0009's fill, NULLs only): one statement per dialect.
FILL_POSTGRESQL = """
UPDATE service_entitlements AS e SET
    stores = coalesce(
        (SELECT (p.definition::jsonb -> 'stores')::text FROM service_products AS p
         WHERE p.code = e.product),
        jsonb_build_array(e.store)::text)
WHERE e.id >= :low AND e.id < :high AND e.stores IS NULL
"""
FILL_SQLITE = """
UPDATE service_entitlements SET
    stores = coalesce(
        (SELECT json_extract(p.definition, '$.stores') FROM service_products AS p
         WHERE p.code = service_entitlements.product),
        json_array(service_entitlements.store))
WHERE id >= :low AND id < :high AND stores IS NULL
"""


def upgrade() -> None:
    with op.batch_alter_table(TABLE) as batch:
        batch.alter_column(COLUMN, existing_type=sa.Text(), nullable=True)


def downgrade() -> None:
    bind = op.get_bind()
    fill = sa.text(FILL_POSTGRESQL if bind.dialect.name == "postgresql" else FILL_SQLITE)
    low, high = bind.execute(
        sa.text(f"SELECT min(id), max(id) FROM {TABLE} WHERE {COLUMN} IS NULL")  # noqa: S608
    ).one()
    if low is not None:
        for start in range(low, high + 1, BACKFILL_ROWS):
            bind.execute(fill, {"low": start, "high": start + BACKFILL_ROWS})
    with op.batch_alter_table(TABLE) as batch:
        batch.alter_column(COLUMN, existing_type=sa.Text(), nullable=False)
